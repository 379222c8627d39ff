#!/usr/bin/env python3
"""Writes the large policy shapes that `vpcgate check` and `explain` must answer fast on (issue 8):

  wide-host.toml      dedicated: 2,000 authorizations on 10.0.0.0/8, each with its own port range,
                      plus 10,000 host authorizations inside it (the overlap multiplies port entries)
  many-auth.toml      dedicated: 100,000 host authorizations (fits: the kernel maps hold 2^20 rules)
  many-reserved.toml  vpc-integration: 200,000 reserved blocks (more than the kernel maps hold) and
                      1,000 authorizations
  largest-fit.toml    dedicated: 16,000 host authorizations with 3 ports each (48,000 port entries; the
                      largest that fit the maps of issue 8, 65,536 port blocks; they now hold 2^22)

Usage: tools/policy-shapes.py DIR
"""
import os
import sys

HEAD_DEDICATED = """[instance]
name = "gw-shape"
kind = "dedicated"
vpc_id = "vpc-gw"
interface = "eth1"
egress_ip = "100.104.12.7"
"""


def auth(name, address, ports, vpc="vpc-backend"):
    ports = ", ".join(f'"{p}"' for p in ports)
    return f'\n[[authorization]]\nname = "{name}"\nvpc_id = "{vpc}"\naddress = "{address}"\nports = [{ports}]\n'


def wide_host(out):
    out.write(HEAD_DEDICATED)
    for i in range(2000):
        lo = 1024 + i * 30
        out.write(auth(f"wide-{i}", "10.0.0.0/8", [f"{lo}-{lo + 9}"]))
    for i in range(10000):
        out.write(auth(f"host-{i}", f"10.{1 + i // 250}.{i % 250}.{1 + i % 200}", [str(80 + i % 7)]))


def many_auth(out):
    out.write(HEAD_DEDICATED)
    for i in range(100000):
        out.write(auth(f"h-{i}", f"10.{i >> 14}.{(i >> 6) & 255}.{4 * (i & 63) + 1}", ["443"]))


def many_reserved(out):
    blocks = ",\n  ".join(f'"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32"' for i in range(200000))
    out.write(f"""[instance]
name = "gw-shape"
kind = "vpc-integration"
vpc_id = "vpc-gw"
interface = "eth1"
egress_ip = "10.0.0.5"
vswitch_cidr = "10.0.0.0/20"
reserved_cidrs = [
  {blocks}
]
""")
    for i in range(1000):
        out.write(auth(f"a-{i}", f"10.0.{i % 16}.{7 + i // 16}", ["80"], vpc="vpc-gw"))


def largest_fit(out):
    out.write(HEAD_DEDICATED)
    for i in range(16000):
        out.write(auth(f"h-{i}", f"10.{i >> 14}.{(i >> 6) & 255}.{4 * (i & 63) + 1}", ["80", "443", "8443"]))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    os.makedirs(d, exist_ok=True)
    for name, f in [("wide-host", wide_host), ("many-auth", many_auth), ("many-reserved", many_reserved),
                    ("largest-fit", largest_fit)]:
        with open(os.path.join(d, name + ".toml"), "w") as out:
            f(out)


if __name__ == "__main__":
    main()
