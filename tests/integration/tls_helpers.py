"""Certificates and keys for the NBD-over-TLS tests, made at test time with GnuTLS's certtool
(nothing private is committed), laid out as QEMU's tls-creds-x509 / tls-creds-psk expect:
a directory per endpoint holding ca-cert.pem and {server,client}-{cert,key}.pem, or keys.psk."""
import os
import secrets
import shutil

from conftest import run

CA_TEMPLATE = 'cn = "{cn}"\nca\ncert_signing_key\nexpiration_days = 2\n'
SERVER_TEMPLATE = ('organization = "vdisk test"\ncn = "localhost"\ndns_name = "localhost"\n'
                   'ip_address = "127.0.0.1"\ntls_www_server\nencryption_key\nsigning_key\n'
                   'expiration_days = 2\n')
CLIENT_TEMPLATE = ('country = "GB"\norganization = "vdisk test"\ncn = "{cn}"\ntls_www_client\n'
                   'encryption_key\nsigning_key\nexpiration_days = 2\n')


def _certtool(*args):
    run(["certtool", *args])


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


class CA:
    """A certificate authority in dir; issue() makes an endpoint directory signed by it."""

    def __init__(self, dir, cn="vdisk test CA"):
        os.makedirs(dir)
        self.dir = dir
        self.key = os.path.join(dir, "ca-key.pem")
        self.cert = os.path.join(dir, "ca-cert.pem")
        tpl = os.path.join(dir, "ca.info")
        _write(tpl, CA_TEMPLATE.format(cn=cn))
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", self.key)
        _certtool("--generate-self-signed", "--load-privkey", self.key, "--template", tpl,
                  "--outfile", self.cert)

    def issue(self, outdir, role, cn="client1", trust=None):
        """outdir/{role}-cert.pem + key signed by this CA; ca-cert.pem = trust's CA (default
        this one)."""
        os.makedirs(outdir, exist_ok=True)
        key = os.path.join(outdir, f"{role}-key.pem")
        tpl = os.path.join(outdir, f"{role}.info")
        _write(tpl, SERVER_TEMPLATE if role == "server" else CLIENT_TEMPLATE.format(cn=cn))
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", key)
        _certtool("--generate-certificate", "--load-privkey", key, "--load-ca-certificate",
                  self.cert, "--load-ca-privkey", self.key, "--template", tpl,
                  "--outfile", os.path.join(outdir, f"{role}-cert.pem"))
        shutil.copy((trust or self).cert, os.path.join(outdir, "ca-cert.pem"))
        return outdir


def psk_dir(dir, username="qemu", key=None):
    """dir/keys.psk with one "username:hexkey" line (psktool's format); returns dir."""
    os.makedirs(dir, exist_ok=True)
    _write(os.path.join(dir, "keys.psk"), f"{username}:{key or secrets.token_hex(32)}\n")
    return dir
