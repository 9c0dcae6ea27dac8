"""`python -m tasks genkey`: the argv tables, and real key sets made with openssl and efitools.

The signed variables are checked the way firmware checks them: the PKCS#7 signature of each
.auth is verified by openssl over (variable name, vendor GUID, attributes, timestamp, list)
with exactly the signer's certificate, and a tampered payload or the wrong signer fails.
"""
from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tasks import keys
from tasks.__main__ import main
from tasks.kinds import PROGRAMS
from tasks.run import CommandError, UsageError, run

ROOT = Path(__file__).resolve().parents[2]
X509_TYPE = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")      # EFI_CERT_X509_GUID
PKCS7_TYPE = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")     # EFI_CERT_TYPE_PKCS7_GUID
MICROSOFT_OWNER = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b")
VENDOR = {"PK": uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c"),   # EFI_GLOBAL_VARIABLE
          "KEK": uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c"),
          "db": uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")}   # EFI_IMAGE_SECURITY_DATABASE_GUID
TIME_BASED_ATTRIBUTES = 0x27  # NON_VOLATILE | BOOTSERVICE | RUNTIME | TIME_BASED_AUTHENTICATED_WRITE
EPOCH = "1700000000"          # 2023-11-14 22:13:20 UTC
SIGNED_BY = {"PK": "PK", "KEK": "PK", "db": "KEK"}

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in keys.TOOLS),
    reason="needs openssl and efitools (bash ci/setup.sh installs them)")


# --- pure tables ---------------------------------------------------------------------------

def test_file_names_and_secrets():
    assert keys.file_names() == [
        "GUID.txt",
        "PK.key", "PK.crt", "PK.der", "PK.esl", "PK.auth",
        "KEK.key", "KEK.crt", "KEK.der", "KEK.esl", "KEK.auth",
        "db.key", "db.crt", "db.der", "db.esl", "db.auth",
        "tpm2-pcr-private.pem", "tpm2-pcr-public.pem"]
    assert keys.secret_names() == ["PK.key", "KEK.key", "db.key", "tpm2-pcr-private.pem"]
    assert {k.var: k.signer for k in keys.KEYS} == SIGNED_BY


@pytest.mark.parametrize("name, var, subj", [
    ("Kairos", "PK", "/CN=Kairos PK"),
    ("ACME, Inc.", "KEK", "/CN=ACME, Inc. KEK"),
    ("a/b+c=d", "db", "/CN=a\\/b\\+c=d db"),
    ("back\\slash", "db", "/CN=back\\\\slash db"),
    ("Ünïcode", "PK", "/CN=Ünïcode PK"),
])
def test_subject(name, var, subj):
    assert keys.subject(name, var) == subj


@pytest.mark.parametrize("argv, expected", [
    (keys.req_argv(Path("d/PK.key"), Path("d/PK.crt"), "/CN=Kairos PK"),
     ["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650", "-utf8",
      "-subj", "/CN=Kairos PK", "-keyout", "d/PK.key", "-out", "d/PK.crt"]),
    (keys.req_argv(Path("k"), Path("c"), "/CN=x", days=1, bits=4096),
     ["openssl", "req", "-new", "-x509", "-newkey", "rsa:4096", "-nodes", "-sha256", "-days", "1", "-utf8",
      "-subj", "/CN=x", "-keyout", "k", "-out", "c"]),
    (keys.x509_argv(Path("d/db.crt"), Path("d/db.der")),
     ["openssl", "x509", "-inform", "PEM", "-in", "d/db.crt", "-outform", "DER", "-out", "d/db.der"]),
    (keys.x509_argv(Path("ms.cer"), Path("w/ms.crt"), inform="DER", outform="PEM"),
     ["openssl", "x509", "-inform", "DER", "-in", "ms.cer", "-outform", "PEM", "-out", "w/ms.crt"]),
    (keys.cert_to_esl_argv("0f0e0d0c-0b0a-4908-8706-050403020100", Path("d/KEK.crt"), Path("w/KEK.esl")),
     ["cert-to-efi-sig-list", "-g", "0f0e0d0c-0b0a-4908-8706-050403020100", "d/KEK.crt", "w/KEK.esl"]),
    (keys.sign_esl_argv("db", "0f0e0d0c-0b0a-4908-8706-050403020100", "2024-01-01 00:00:00",
                        Path("d/KEK.key"), Path("d/KEK.crt"), Path("d/db.esl"), Path("d/db.auth")),
     ["sign-efi-sig-list", "-t", "2024-01-01 00:00:00", "-g", "0f0e0d0c-0b0a-4908-8706-050403020100",
      "-k", "d/KEK.key", "-c", "d/KEK.crt", "db", "d/db.esl", "d/db.auth"]),
])
def test_argv(argv, expected):
    assert argv == expected


@pytest.mark.parametrize("environ, stamp", [
    ({}, "2024-01-01 00:00:00"),
    ({"SOURCE_DATE_EPOCH": ""}, "2024-01-01 00:00:00"),
    ({"SOURCE_DATE_EPOCH": "0"}, "1970-01-01 00:00:00"),
    ({"SOURCE_DATE_EPOCH": EPOCH}, "2023-11-14 22:13:20"),
    ({"SOURCE_DATE_EPOCH": " 1700000000\n"}, "2023-11-14 22:13:20"),
    ({"SOURCE_DATE_EPOCH": "253402300799"}, "9999-12-31 23:59:59"),
])
def test_auth_timestamp(environ, stamp):
    assert keys.auth_timestamp(environ) == stamp


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1e9", "253402300800"])
def test_auth_timestamp_refuses_what_is_not_an_epoch(value):
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        keys.auth_timestamp({"SOURCE_DATE_EPOCH": value})


@pytest.mark.parametrize("name, ok", [
    ("Kairos", True), ("x" * 60, True), ("x" * 61, False), ("", False), ("   ", False), ("a\nb", False),
    ("tab\there", False),
])
def test_check_name(name, ok):
    if ok:
        keys.check_name(name)
    else:
        with pytest.raises(UsageError, match="--name"):
            keys.check_name(name)


@pytest.mark.parametrize("data, form", [
    (b"-----BEGIN CERTIFICATE-----\n", "PEM"), (b"\n  -----BEGIN CERTIFICATE-----", "PEM"),
    (b"\x30\x82\x03\x00", "DER"), (b"", "DER")])
def test_cert_format(data, form):
    assert keys.cert_format(data) == form


def esl_bytes(kind: uuid.UUID, entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    size = 16 + len(entries[0][1])
    body = b"".join(owner.bytes_le + data for owner, data in entries)
    return kind.bytes_le + struct.pack("<III", 28 + len(body), 0, size) + body


def test_esl_entries_reads_concatenated_lists():
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    data = esl_bytes(X509_TYPE, [(a, b"cert-one")]) + esl_bytes(X509_TYPE, [(b, b"two!"), (c, b"3333")])
    assert keys.esl_entries(data) == [(X509_TYPE, a, b"cert-one"), (X509_TYPE, b, b"two!"), (X509_TYPE, c, b"3333")]
    assert keys.esl_entries(b"") == []
    for broken in (data[:20], data[:-1], data[:28 + 16 + 8] + b"\0" * 30):
        with pytest.raises(ValueError):
            keys.esl_entries(broken)


def test_programs_name_their_debian_packages():
    assert {t: PROGRAMS[t].provider for t in
            ("openssl", "cert-to-efi-sig-list", "sign-efi-sig-list", "sbsign", "sbverify")} == {
        "openssl": "Debian package openssl",
        "cert-to-efi-sig-list": "Debian package efitools", "sign-efi-sig-list": "Debian package efitools",
        "sbsign": "Debian package sbsigntool", "sbverify": "Debian package sbsigntool"}
    for tool in ("openssl", "cert-to-efi-sig-list", "sign-efi-sig-list", "sbsign", "sbverify"):
        version = PROGRAMS[tool].version
        assert version and version[0] == tool
        if shutil.which(tool):
            assert re.search(r"\d+\.\d+", run(list(version), capture=True))


# --- helpers: parse and verify what genkey wrote ------------------------------------------------

def parse_esl(data: bytes) -> list[tuple[uuid.UUID, uuid.UUID, bytes]]:
    """EFI_SIGNATURE_LISTs by the UEFI spec (independent of tasks.keys.esl_entries)."""
    out, offset = [], 0
    while offset < len(data):
        kind = uuid.UUID(bytes_le=data[offset:offset + 16])
        list_size, header_size, sig_size = struct.unpack_from("<III", data, offset + 16)
        assert list_size >= 28 and (list_size - 28 - header_size) % sig_size == 0
        pos = offset + 28 + header_size
        while pos < offset + list_size:
            out.append((kind, uuid.UUID(bytes_le=data[pos:pos + 16]), data[pos + 16:pos + sig_size]))
            pos += sig_size
        offset += list_size
    assert offset == len(data)
    return out


def parse_auth(data: bytes) -> tuple[bytes, bytes, bytes]:
    """EFI_VARIABLE_AUTHENTICATION_2: (EFI_TIME, PKCS#7 SignedData, the signature list after it)."""
    length, revision, cert_type = struct.unpack_from("<IHH", data, 16)
    assert revision == 0x0200 and cert_type == 0x0EF1  # WIN_CERT_TYPE_EFI_GUID
    assert uuid.UUID(bytes_le=data[24:40]) == PKCS7_TYPE
    return data[:16], data[40:16 + length], data[16 + length:]


def efi_time(stamp: str) -> bytes:
    t = datetime.datetime.strptime(stamp, keys.TIMESTAMP_FORMAT)
    return struct.pack("<HBBBBBBIhBB", t.year, t.month, t.day, t.hour, t.minute, t.second, 0, 0, 0, 0, 0)


def der_tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def verifies(auth: Path, var: str, signer_crt: Path, work: Path, tamper: bool = False) -> bool:
    """Does ``auth`` carry a valid signature of ``signer_crt`` (and only that certificate) over what
    firmware hashes: the variable name (UTF-16LE), vendor GUID, attributes, timestamp and list?"""
    timestamp, signed_data, esl = parse_auth(auth.read_bytes())
    payload = (var.encode("utf-16-le") + VENDOR[var].bytes_le + struct.pack("<I", TIME_BASED_ATTRIBUTES)
               + timestamp + esl)
    if tamper:
        payload = payload[:-1] + bytes([payload[-1] ^ 1])
    # the .auth holds a bare SignedData; openssl wants it inside a ContentInfo (OID signedData)
    content_info = der_tlv(0x30, bytes.fromhex("06092a864886f70d010702") + der_tlv(0xA0, signed_data))
    (work / "p7.der").write_bytes(content_info)
    (work / "payload").write_bytes(payload)
    proc = subprocess.run(
        ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(work / "p7.der"), "-binary",
         "-content", str(work / "payload"), "-certfile", str(signer_crt), "-nointern",
         "-CAfile", str(signer_crt), "-purpose", "any", "-out", os.devnull],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def make_cert(path: Path, cn: str, form: str = "PEM") -> Path:
    """A throwaway self-signed certificate (its key is discarded), e.g. a stand-in for Microsoft's."""
    pem = path.with_name(path.name + ".pem")
    run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
         "-subj", f"/CN={cn}", "-keyout", str(path.with_name(path.name + ".key")), "-out", str(pem)])
    path.with_name(path.name + ".key").unlink()
    if form == "DER":
        run(["openssl", "x509", "-in", str(pem), "-outform", "DER", "-out", str(path)])
        pem.unlink()
    else:
        pem.rename(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    """One real key set (SOURCE_DATE_EPOCH fixed), made once for the read-only checks."""
    dest = tmp_path_factory.mktemp("genkey") / "keys"
    written = keys.generate(dest, "Kairos Test", environ={"SOURCE_DATE_EPOCH": EPOCH})
    assert written == [dest.absolute() / n for n in keys.file_names()]
    return dest


# --- a real key set ---------------------------------------------------------------------------------

def test_every_file_is_written_with_its_mode(keyset):
    assert sorted(os.listdir(keyset)) == sorted(keys.file_names())
    assert stat.S_IMODE(keyset.stat().st_mode) == 0o700
    for name in keys.file_names():
        mode = stat.S_IMODE((keyset / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") or name == "tpm2-pcr-private.pem" else 0o644), name
    assert not [p for p in keyset.parent.iterdir() if p.name != "keys"], "scratch directory left behind"
    guid = (keyset / "GUID.txt").read_text()
    assert guid.endswith("\n") and uuid.UUID(guid.strip()).version == 4


@pytest.mark.parametrize("var", ["PK", "KEK", "db"])
def test_certificates_are_self_signed_rsa_2048(keyset, var):
    cert = x509.load_pem_x509_certificate((keyset / f"{var}.crt").read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [f"Kairos Test {var}"] and cert.issuer == cert.subject
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 3650
    assert x509.load_der_x509_certificate((keyset / f"{var}.der").read_bytes()) == cert
    cert.verify_directly_issued_by(cert)  # the signature is the certificate's own key's
    key_text = (keyset / f"{var}.key").read_text()
    assert key_text.startswith("-----BEGIN PRIVATE KEY-----")  # unencrypted PKCS#8 (-nodes)


@pytest.mark.parametrize("var", ["PK", "KEK", "db"])
def test_signature_lists_hold_the_certificate_and_the_owner_guid(keyset, var):
    owner = uuid.UUID((keyset / "GUID.txt").read_text().strip())
    assert parse_esl((keyset / f"{var}.esl").read_bytes()) == [(X509_TYPE, owner, (keyset / f"{var}.der").read_bytes())]
    round_trip = keyset.parent / f"roundtrip-{var}"  # efitools' own reader: one certificate out
    run(["sig-list-to-certs", str(keyset / f"{var}.esl"), str(round_trip)])
    assert Path(f"{round_trip}-0.der").read_bytes() == (keyset / f"{var}.der").read_bytes()
    assert not Path(f"{round_trip}-1.der").exists()


@pytest.mark.parametrize("var", ["PK", "KEK", "db"])
def test_auth_files_are_signed_by_the_key_above(keyset, var, tmp_path):
    auth = keyset / f"{var}.auth"
    timestamp, _, esl = parse_auth(auth.read_bytes())
    assert timestamp == efi_time("2023-11-14 22:13:20")
    assert esl == (keyset / f"{var}.esl").read_bytes()
    assert verifies(auth, var, keyset / f"{SIGNED_BY[var]}.crt", tmp_path)
    assert not verifies(auth, var, keyset / f"{SIGNED_BY[var]}.crt", tmp_path, tamper=True)
    for other in {"PK", "KEK", "db"} - {SIGNED_BY[var]}:
        assert not verifies(auth, var, keyset / f"{other}.crt", tmp_path), f"{var}.auth verifies with {other}"


def test_signing_again_with_the_same_epoch_gives_identical_auth_files(keyset, tmp_path):
    guid = (keyset / "GUID.txt").read_text().strip()
    for var, signer in SIGNED_BY.items():
        for epoch, same in ((EPOCH, True), ("1700000001", False)):
            again = tmp_path / f"{var}-{epoch}.auth"
            run(keys.sign_esl_argv(var, guid, keys.auth_timestamp({"SOURCE_DATE_EPOCH": epoch}),
                                   keyset / f"{signer}.key", keyset / f"{signer}.crt", keyset / f"{var}.esl", again))
            assert (again.read_bytes() == (keyset / f"{var}.auth").read_bytes()) == same, (var, epoch)


def test_default_timestamp_without_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    keys.generate(tmp_path / "keys")
    for var in SIGNED_BY:
        assert parse_auth((tmp_path / "keys" / f"{var}.auth").read_bytes())[0] == efi_time("2024-01-01 00:00:00")
    cert = x509.load_pem_x509_certificate((tmp_path / "keys" / "PK.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Kairos PK"


def test_existing_keys_are_refused_and_force_replaces_them_keeping_the_guid(tmp_path):
    dest = tmp_path / "keys"
    env = {"SOURCE_DATE_EPOCH": EPOCH}
    keys.generate(dest, environ=env)
    (dest / "README").write_text("not a key\n")
    before = snapshot(dest)
    with pytest.raises(UsageError, match=r"already holds keys \(GUID.txt, PK.key, PK.crt and 15 more\).*--force"):
        keys.generate(dest, environ=env)
    assert snapshot(dest) == before
    keys.generate(dest, force=True, environ=env)
    after = snapshot(dest)
    assert after.keys() == before.keys() and after["README"] == before["README"]
    assert after["GUID.txt"] == before["GUID.txt"]
    changed = {n for n in keys.file_names() if after[n] != before[n]}
    assert changed == set(keys.file_names()) - {"GUID.txt"}
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []


def test_an_existing_directory_without_keys_gets_them(tmp_path):
    dest = tmp_path / "keys"
    dest.mkdir()
    (dest / ".gitignore").write_text("*.key\n")
    keys.generate(dest, environ={})
    assert sorted(os.listdir(dest)) == sorted([".gitignore", *keys.file_names()])
    assert (dest / ".gitignore").read_text() == "*.key\n"


def test_a_failed_run_leaves_no_partial_key_set(tmp_path, monkeypatch):
    """sign-efi-sig-list failing after the keys exist: nothing appears, old keys stay as they were."""
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "sign-efi-sig-list").write_text("#!/bin/sh\necho 'cannot sign' >&2\nexit 3\n")
    (broken / "sign-efi-sig-list").chmod(0o755)
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}{path}")
    with pytest.raises(CommandError, match="sign PK.auth with PK"):
        keys.generate(tmp_path / "new" / "keys", environ={})
    assert os.listdir(tmp_path / "new") == []

    monkeypatch.setenv("PATH", path)
    keys.generate(tmp_path / "old", environ={})
    before = snapshot(tmp_path / "old")
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}{path}")
    with pytest.raises(CommandError):
        keys.generate(tmp_path / "old", force=True, environ={})
    assert snapshot(tmp_path / "old") == before
    assert not [p for p in (tmp_path / "old").iterdir() if p.name.startswith(".")]


def test_missing_efitools_names_the_debian_package(tmp_path, monkeypatch):
    only_openssl = tmp_path / "bin"
    only_openssl.mkdir()
    (only_openssl / "openssl").symlink_to(shutil.which("openssl"))
    monkeypatch.setenv("PATH", str(only_openssl))
    with pytest.raises(UsageError, match="cannot find cert-to-efi-sig-list, .*; install Debian package efitools"):
        keys.generate(tmp_path / "keys", environ={})
    assert not (tmp_path / "keys").exists()


def test_microsoft_certificates_are_appended_to_kek_and_db(tmp_path):
    # stand-ins for Microsoft's certificate files (nothing is downloaded): DER like Microsoft ships, and PEM
    kek_ms = make_cert(tmp_path / "standin-microsoft-kek-ca.der", "Stand-in for Microsoft Corporation KEK CA", "DER")
    db_ms = [make_cert(tmp_path / "standin-microsoft-windows-pca.der", "Stand-in for Microsoft Windows PCA", "DER"),
             make_cert(tmp_path / "standin-microsoft-uefi-ca.pem", "Stand-in for Microsoft UEFI CA", "PEM")]
    dest = tmp_path / "keys"
    keys.generate(dest, microsoft_kek=[kek_ms], microsoft_db=db_ms, environ={"SOURCE_DATE_EPOCH": EPOCH})
    owner = uuid.UUID((dest / "GUID.txt").read_text().strip())

    def der(path: Path) -> bytes:
        data = path.read_bytes()
        return x509.load_pem_x509_certificate(data).public_bytes(
            serialization.Encoding.DER) if data.startswith(b"-----") else data

    expected = {"PK": [(X509_TYPE, owner, (dest / "PK.der").read_bytes())],
                "KEK": [(X509_TYPE, owner, (dest / "KEK.der").read_bytes()),
                        (X509_TYPE, MICROSOFT_OWNER, der(kek_ms))],
                "db": [(X509_TYPE, owner, (dest / "db.der").read_bytes())]
                + [(X509_TYPE, MICROSOFT_OWNER, der(p)) for p in db_ms]}
    for var, entries in expected.items():
        esl = (dest / f"{var}.esl").read_bytes()
        assert parse_esl(esl) == entries, var
        assert parse_auth((dest / f"{var}.auth").read_bytes())[2] == esl
        assert verifies(dest / f"{var}.auth", var, dest / f"{SIGNED_BY[var]}.crt", tmp_path)
    assert sorted(os.listdir(dest)) == sorted(keys.file_names())  # the stand-ins' work files stay out


# --- the command line ---------------------------------------------------------------------------------

def genkey(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", "genkey", *args], cwd=ROOT, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def key_material(dest: Path) -> list[str]:
    """Every base64 line of the private keys (64 characters each, the last one shorter)."""
    return [line for name in keys.secret_names() for line in (dest / name).read_text().splitlines()
            if line and not line.startswith("-----")]


def test_cli_writes_keys_and_never_prints_private_key_material(tmp_path):
    dest = tmp_path / "keys"
    proc = genkey(str(dest), "--name", "CLI", env={"KAIROS_VERBOSE": "1"})  # verbose: program output too
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    for name in keys.file_names():
        assert name in output
    assert "PRIVATE KEY" not in output
    lines = key_material(dest)
    assert len(lines) > 3 * 20
    assert not [line for line in lines if line[:24] in output]
    assert base64.b64decode("".join(lines[:4])) not in output.encode()
    # a private key handed where a certificate belongs: refused without echoing it
    proc = genkey(str(tmp_path / "other"), "--microsoft-db", str(dest / "db.key"), env={"KAIROS_VERBOSE": "1"})
    assert proc.returncode == 2
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr
    assert not [line for line in lines if line[:24] in proc.stdout + proc.stderr]


@pytest.mark.parametrize("case, message", [
    ("dir-is-a-file", "exists and is not a directory"),
    ("missing-kek", "--microsoft-kek .*missing.der: no such file"),
    ("not-a-cert", "--microsoft-db .*notes.txt: not an X.509 certificate"),
    ("two-certs-in-one-file", "holds several certificates; give each in its own file"),
    ("bad-epoch", "SOURCE_DATE_EPOCH='yesterday'"),
    ("empty-name", "--name ''"),
    ("holds-keys", "already holds keys .*use --force"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, case, message):
    dest = tmp_path / "keys"
    args = [str(dest)]
    if case == "dir-is-a-file":
        dest.write_text("x")
    elif case == "missing-kek":
        args += ["--microsoft-kek", str(tmp_path / "missing.der")]
    elif case == "not-a-cert":
        (tmp_path / "notes.txt").write_text("hello\n")
        args += ["--microsoft-db", str(tmp_path / "notes.txt")]
    elif case == "two-certs-in-one-file":
        one, two = make_cert(tmp_path / "a.pem", "one"), make_cert(tmp_path / "b.pem", "two")
        (tmp_path / "both.pem").write_bytes(one.read_bytes() + two.read_bytes())
        args += ["--microsoft-kek", str(tmp_path / "both.pem")]
    elif case == "bad-epoch":
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    elif case == "empty-name":
        args += ["--name", ""]
    elif case == "holds-keys":
        dest.mkdir()
        (dest / "db.key").write_text("old\n")
    assert main(["genkey", *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    if case != "dir-is-a-file" and case != "holds-keys":
        assert not dest.exists()


def test_cli_bad_input_as_a_process():
    proc = genkey("/dev/null")
    assert proc.returncode == 2
    assert proc.stderr == "error: /dev/null exists and is not a directory; give a new or empty directory " \
                          "for the keys\n"


def test_cli_help_says_what_is_secret():
    proc = genkey("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for words in ("PK.key KEK.key db.key", "SECRET: keep them out of git, CI logs",
                  "the signed variable updates firmware enrolment uses", "--microsoft-kek FILE", "--force",
                  "SOURCE_DATE_EPOCH", "Everything except the .key files and tpm2-pcr-private.pem is public",
                  "tpm2-pcr-private.pem RSA-2048 key signing the UKIs' TPM PCR 11 policies"):
        assert words in text, words


def test_the_pcr_policy_key_pair_is_rsa_2048(keyset):
    private = serialization.load_pem_private_key((keyset / "tpm2-pcr-private.pem").read_bytes(), None)
    public = serialization.load_pem_public_key((keyset / "tpm2-pcr-public.pem").read_bytes())
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert public.public_numbers() == private.public_key().public_numbers()
