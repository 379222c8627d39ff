//! The command line's contract, checked without privileges.

use clap::{CommandFactory, Parser};
use vpcgate::cli::Cli;

#[test]
fn command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn help_names_every_command_and_the_exit_statuses() {
    let help = Cli::command().render_long_help().to_string();
    for needle in [
        "preflight",
        "Exit status: 0 ok, 1",
        "2 usage or runtime error",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn unknown_output_format_is_a_usage_error() {
    let err = Cli::try_parse_from(["vpcgate", "preflight", "--output", "yaml"]).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("yaml"));
}
