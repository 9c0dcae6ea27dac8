"""Secure Boot keys for Trusted Boot images: `python -m tasks genkey DIR`.

Writes the key set AuroraBoot's `genkey` writes, with openssl and Debian's efitools:
PK, KEK and db key pairs (RSA-2048, self-signed X.509), an owner GUID, EFI signature
lists and the signed variable updates firmware enrols (PK self-signed, KEK signed by
PK, db signed by KEK). Microsoft's KEK and db certificates, given as files, are
appended to KEK and db so the firmware keeps trusting Microsoft-signed boot loaders
and option ROMs; nothing is downloaded. Also, as AuroraBoot's, an RSA key pair that
signs the UKIs' TPM PCR 11 policies (`tpm2-pcr-private.pem`, `tpm2-pcr-public.pem`).

The pure argv builders below are table-tested; `generate` runs them through `run()` in
a scratch directory next to a new DIR (inside an existing one) and moves the finished
set into place at the end, so an interrupted run never leaves a partial key set.
Private keys never reach a log line or message: only file names are printed.
"""
from __future__ import annotations

import datetime
import os
import signal
import ssl
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .epoch import environment_epoch
from .run import CommandError, KairosError, UsageError, require_tool, run, say
from .state import scratch_dir


@dataclass(frozen=True)
class Key:
    """One Secure Boot variable and the key pair behind it."""

    var: str      # EFI variable name, also the file stem: PK.key, PK.crt, ...
    signer: str   # the key whose private half signs the variable's .auth


KEYS: tuple[Key, ...] = (
    Key("PK", "PK"),    # Platform Key, the root of trust: signs KEK updates (and its own)
    Key("KEK", "PK"),   # Key Exchange Key: signs db updates
    Key("db", "KEK"),   # signature database: its key signs the UKIs and boot loaders (sbsign)
)
SECRET_SUFFIX = ".key"                          # RSA private keys, mode 0600
PUBLIC_SUFFIXES = (".crt", ".der", ".esl", ".auth")
GUID_FILE = "GUID.txt"
PCR_PRIVATE, PCR_PUBLIC = "tpm2-pcr-private.pem", "tpm2-pcr-public.pem"   # signs the UKIs' PCR 11 policies
SCRATCH_NAME = "genkey"                         # .genkey.partial-<pid>: the work directory inside an existing DIR
MICROSOFT = {"KEK": "--microsoft-kek", "db": "--microsoft-db"}  # variable -> option adding Microsoft certs
MICROSOFT_OWNER = "77fa9abd-0359-4d32-bd60-28f4e78f784b"       # Microsoft's signature owner GUID
X509_TYPE = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")  # EFI_CERT_X509_GUID
ESL_HEADER = struct.Struct("<16sIII")    # SignatureType, ListSize, HeaderSize, SignatureSize
DEFAULT_NAME = "Kairos"
KEY_BITS = 2048
DAYS = 3650
CN_MAX = 64                                # X.520 upper bound of a commonName
DEFAULT_EPOCH = 1704067200                 # 2024-01-01 00:00:00 UTC: .auth timestamp without SOURCE_DATE_EPOCH
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"     # what `sign-efi-sig-list -t` parses; anything else gives garbage
SECRET_MODE, PUBLIC_MODE, DIR_MODE = 0o600, 0o644, 0o700
TOOLS = {
    "openssl": "generate the Secure Boot keys and certificates",
    "cert-to-efi-sig-list": "write the EFI signature lists (.esl) of the Secure Boot keys",
    "sign-efi-sig-list": "sign the Secure Boot variable updates (.auth)",
}


def file_names() -> list[str]:
    """Every file of a key set, in the order `generate` moves them into place."""
    return [GUID_FILE] + [k.var + s for k in KEYS for s in (SECRET_SUFFIX, *PUBLIC_SUFFIXES)] + [PCR_PRIVATE, PCR_PUBLIC]


def secret_names() -> list[str]:
    return [k.var + SECRET_SUFFIX for k in KEYS] + [PCR_PRIVATE]


# --- pure parts: names, argv, timestamps, signature lists ------------------------------

def common_name(name: str, var: str) -> str:
    return f"{name} {var}"


def subject(name: str, var: str) -> str:
    """openssl's `-subj` for a key's certificate; `\\`, `/` and `+` escaped."""
    value = common_name(name, var)
    for char in ("\\", "/", "+"):
        value = value.replace(char, "\\" + char)
    return f"/CN={value}"


def check_name(name: str) -> None:
    longest = max((common_name(name, k.var) for k in KEYS), key=len)
    if not name.strip() or not name.isprintable():
        raise UsageError(f"--name {name!r}: give a non-empty name of printable characters")
    if len(longest) > CN_MAX:
        raise UsageError(f"--name {name!r}: too long (the certificate name {longest!r} must fit in {CN_MAX} "
                         f"characters)")


def req_argv(key: Path, crt: Path, subj: str, days: int = DAYS, bits: int = KEY_BITS) -> list[str]:
    """A new RSA key (unencrypted) and its self-signed SHA-256 certificate (PEM)."""
    return ["openssl", "req", "-new", "-x509", "-newkey", f"rsa:{bits}", "-nodes", "-sha256",
            "-days", str(days), "-utf8", "-subj", subj, "-keyout", str(key), "-out", str(crt)]


def pcr_key_argv(key: Path, bits: int = KEY_BITS) -> list[str]:
    """The RSA key (PEM, unencrypted) that signs PCR policies (systemd-measure sign --private-key)."""
    return ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}", "-out", str(key)]


def public_key_argv(key: Path, out: Path) -> list[str]:
    """The public half of ``key`` (PEM SubjectPublicKeyInfo): the UKIs' .pcrpkey."""
    return ["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(out)]


def x509_argv(src: Path, out: Path, inform: str = "PEM", outform: str = "DER") -> list[str]:
    """Convert a certificate between PEM and DER (and check it is one)."""
    return ["openssl", "x509", "-inform", inform, "-in", str(src), "-outform", outform, "-out", str(out)]


def cert_to_esl_argv(guid: str, crt: Path, esl: Path) -> list[str]:
    """An EFI signature list holding the PEM certificate ``crt``, owned by ``guid``."""
    return ["cert-to-efi-sig-list", "-g", guid, str(crt), str(esl)]


def sign_esl_argv(var: str, guid: str, timestamp: str, key: Path, crt: Path, esl: Path, auth: Path) -> list[str]:
    """The authenticated update of variable ``var`` to ``esl``, signed by ``key``/``crt``."""
    return ["sign-efi-sig-list", "-t", timestamp, "-g", guid, "-k", str(key), "-c", str(crt),
            var, str(esl), str(auth)]


def auth_timestamp(environ: Mapping[str, str]) -> str:
    """The .auth timestamp (UTC): SOURCE_DATE_EPOCH when set, else DEFAULT_EPOCH."""
    epoch = environment_epoch(environ, DEFAULT_EPOCH)
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(TIMESTAMP_FORMAT)


def esl_entries(data: bytes) -> list[tuple[uuid.UUID, uuid.UUID, bytes]]:
    """(signature type, owner, data) of every entry of concatenated EFI_SIGNATURE_LISTs."""
    entries = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < ESL_HEADER.size:
            raise ValueError(f"truncated signature list header at byte {offset}")
        kind, size, header, sig_size = ESL_HEADER.unpack_from(data, offset)
        body = size - ESL_HEADER.size - header
        if sig_size < 16 or body < 0 or body % sig_size or offset + size > len(data):
            raise ValueError(f"malformed signature list at byte {offset}")
        for pos in range(offset + ESL_HEADER.size + header, offset + size, sig_size):
            entries.append((uuid.UUID(bytes_le=kind), uuid.UUID(bytes_le=data[pos:pos + 16]),
                            data[pos + 16:pos + sig_size]))
        offset += size
    return entries


def cert_format(data: bytes) -> str:
    """"PEM" or "DER" (what openssl's -inform takes) for a certificate file's bytes."""
    return "PEM" if data.lstrip().startswith(b"-----BEGIN") else "DER"


# --- checks before any work -------------------------------------------------------------

def held_keys(dest: Path) -> list[str]:
    """The key-set files ``dest`` already holds."""
    return [n for n in file_names() if (dest / n).exists() or (dest / n).is_symlink()]


def check_dest(dest: Path, force: bool) -> str | None:
    """Refuse a DIR that is not a directory, or holds keys without --force; return the owner GUID to
    keep (--force over an earlier set keeps its GUID.txt), else None."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory; give a new or empty directory for the keys")
    held = held_keys(dest) if dest.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise UsageError(f"{dest} already holds keys ({shown}); use --force to replace them")
    guid_file = dest / GUID_FILE
    if not guid_file.is_file():
        return None
    text = guid_file.read_text(errors="replace").strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise UsageError(f"{guid_file} does not hold a GUID ({text[:40]!r}); remove it to get a new one") from None


def check_cert_file(option: str, path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path}: cannot read it")
    return path


# --- the run ------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _esl(guid: str, crt: Path, esl: Path, der: bytes, what: str) -> bytes:
    """Write the signature list of ``crt`` and check it holds exactly that certificate
    (cert-to-efi-sig-list writes an empty entry, with exit status 0, for input it cannot read)."""
    run(cert_to_esl_argv(guid, crt, esl), what=f"write the signature list of {what}")
    data = esl.read_bytes()
    try:
        entries = esl_entries(data)
    except ValueError as exc:
        raise KairosError(f"cert-to-efi-sig-list wrote an unreadable signature list for {what}: {exc}") from None
    if entries != [(X509_TYPE, uuid.UUID(guid), der)]:
        raise KairosError(f"cert-to-efi-sig-list did not put the certificate of {what} into {esl.name}")
    return data


def _microsoft_esl(option: str, src: Path, work: Path, index: int) -> tuple[str, bytes]:
    """(label for progress lines, signature list) of one user-supplied Microsoft certificate (PEM or DER)."""
    stem = work / f"microsoft-{option.rsplit('-', 1)[-1]}-{index}"
    data = src.read_bytes()
    if data.count(b"-----BEGIN CERTIFICATE-----") > 1:
        raise UsageError(f"{option} {src}: holds several certificates; give each in its own file "
                         f"(repeat {option})")
    pem = stem.with_suffix(".crt")
    try:
        run(x509_argv(src, pem, inform=cert_format(data), outform="PEM"), what=f"read {option} {src}")
    except CommandError:
        raise UsageError(f"{option} {src}: not an X.509 certificate (PEM or DER)") from None
    der = ssl.PEM_cert_to_DER_cert(pem.read_text())
    return f"{option} {src.name}", _esl(MICROSOFT_OWNER, pem, stem.with_suffix(".esl"), der, f"{option} {src}")


def _install(built: Path, dest: Path) -> None:
    """Move the finished key set into ``dest``: a new ``dest`` is one rename of the whole directory;
    into an existing one (the scratch directory is inside it, on its file system), file by file
    with SIGINT/SIGTERM held off, so Ctrl-C cannot stop it halfway."""
    if not dest.exists():
        os.rename(built, dest)
    else:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for name in file_names():
                os.replace(built / name, dest / name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        _fsync(dest)
    _fsync(dest.parent)


def generate(dir: Path, name: str = DEFAULT_NAME, microsoft_kek: Sequence[Path] = (),
             microsoft_db: Sequence[Path] = (), force: bool = False,
             environ: Mapping[str, str] | None = None) -> list[Path]:
    """Write a Secure Boot key set into ``dir`` (see the module docstring); return its files.

    Every check (name, DIR, the Microsoft files, SOURCE_DATE_EPOCH, tools) runs before any work.
    """
    dest = Path(dir).absolute()
    check_name(name)
    timestamp = auth_timestamp(os.environ if environ is None else environ)
    extra_files = {"KEK": [check_cert_file(MICROSOFT["KEK"], p) for p in microsoft_kek],
                   "db": [check_cert_file(MICROSOFT["db"], p) for p in microsoft_db]}
    kept_guid = check_dest(dest, force)
    for tool, purpose in TOOLS.items():
        require_tool(tool, purpose)
    try:
        # next to a new DIR (renamed into place at once), inside an existing one (its file system)
        where = (dest, SCRATCH_NAME) if dest.exists() else (dest.parent, dest.name)
        with scratch_dir(*where) as scratch:
            os.chmod(scratch, DIR_MODE)
            out, work = scratch / "keys", scratch / "work"
            out.mkdir(mode=DIR_MODE)
            work.mkdir(mode=DIR_MODE)
            extras = {var: [_microsoft_esl(MICROSOFT[var], p, work, i) for i, p in enumerate(files)]
                      for var, files in extra_files.items()}
            guid = kept_guid or str(uuid.uuid4())
            (out / GUID_FILE).write_text(guid + "\n")
            say(f"genkey: {GUID_FILE}: owner GUID {guid} ({'kept from the earlier set' if kept_guid else 'new'})")
            for k in KEYS:
                say(f"genkey: {k.var}: RSA-{KEY_BITS} key {k.var}{SECRET_SUFFIX} and self-signed certificate "
                    f"{k.var}.crt, {k.var}.der (CN={common_name(name, k.var)}, {DAYS} days)")
                key, crt = out / f"{k.var}{SECRET_SUFFIX}", out / f"{k.var}.crt"
                run(req_argv(key, crt, subject(name, k.var)), what=f"generate the {k.var} key")
                os.chmod(key, SECRET_MODE)
                run(x509_argv(crt, out / f"{k.var}.der"), what=f"write {k.var}.der")
            for k in KEYS:
                esl = out / f"{k.var}.esl"
                data = _esl(guid, out / f"{k.var}.crt", work / f"{k.var}.esl",
                            (out / f"{k.var}.der").read_bytes(), f"{k.var}.crt")
                for label, more in extras.get(k.var, ()):
                    say(f"genkey: {esl.name}: appending Microsoft's certificate from {label}")
                    data += more
                esl.write_bytes(data)
                say(f"genkey: {k.var}.auth: update of {k.var} signed by {k.signer} (timestamp {timestamp} UTC)")
                run(sign_esl_argv(k.var, guid, timestamp, out / f"{k.signer}{SECRET_SUFFIX}",
                                  out / f"{k.signer}.crt", esl, out / f"{k.var}.auth"),
                    what=f"sign {k.var}.auth with {k.signer}")
            say(f"genkey: {PCR_PRIVATE}: RSA-{KEY_BITS} key signing the UKIs' TPM PCR 11 policies, "
                f"public half {PCR_PUBLIC}")
            run(pcr_key_argv(out / PCR_PRIVATE), what="generate the PCR policy key")
            os.chmod(out / PCR_PRIVATE, SECRET_MODE)
            run(public_key_argv(out / PCR_PRIVATE, out / PCR_PUBLIC), what=f"write {PCR_PUBLIC}")
            for n in file_names():
                os.chmod(out / n, SECRET_MODE if n in secret_names() else PUBLIC_MODE)
                _fsync(out / n)
            _fsync(out)
            _install(out, dest)
    except BrokenPipeError:
        raise  # stdout went away (`| head`): not a problem of DIR; the scratch directory is gone already
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise UsageError(f"cannot write the keys to {dest}: {exc.strerror or exc}{where}") from None
    written = [dest / n for n in file_names()]
    say(f"genkey: wrote {len(written)} files to {dest}:")
    for path in written:
        secret = path.name in secret_names()
        say(f"  {path.name:<9} {'SECRET: keep out of git, CI logs and artifacts' if secret else ''}".rstrip())
    say("genkey: firmware enrols the .auth files (db and KEK first, PK last); db.key and db.crt sign the UKIs")
    return written


HELP = f"""\
Generate a Secure Boot key set for Trusted Boot (UKI) images into DIR, like
AuroraBoot's genkey, with openssl and efitools. A new DIR is created with mode
0700; a DIR that already holds keys is refused unless --force. Files:

  GUID.txt                 owner GUID of the signature lists (random; --force keeps it)
  PK.key  KEK.key  db.key  RSA-{KEY_BITS} private keys, mode 0600. SECRET: keep them out of git,
                           CI logs and build artifacts; store them offline or in a secret
                           store. db.key (with db.crt) signs the UKIs (sbsign); PK.key and
                           KEK.key are needed only to sign later KEK/db updates.
  PK.crt  KEK.crt  db.crt  self-signed X.509 certificates (PEM), CN "<NAME> PK" etc.,
                           valid {DAYS} days
  PK.der  KEK.der  db.der  the same certificates in DER (for firmware setup menus)
  PK.esl  KEK.esl  db.esl  EFI signature lists; KEK.esl and db.esl end with the
                           --microsoft-kek / --microsoft-db certificates
  PK.auth KEK.auth db.auth the signed variable updates firmware enrolment uses (systemd-boot
                           secure-boot-enroll, KeyTool, efi-updatevar): PK self-signed, KEK
                           signed by PK, db signed by KEK. Enrol db and KEK first, PK last.
  tpm2-pcr-private.pem     RSA-2048 key signing the UKIs' TPM PCR 11 policies (systemd-measure),
                           mode 0600. SECRET, like the .key files.
  tpm2-pcr-public.pem      its public half: the UKIs' .pcrpkey (systemd-cryptenroll
                           --tpm2-public-key binds disk keys to it)

Everything except the .key files and tpm2-pcr-private.pem is public. Without
--microsoft-kek/--microsoft-db the firmware trusts only these keys: Windows, and option
ROMs signed by Microsoft (GPUs, network cards) on many machines, will no longer load. Give Microsoft's certificates,
each in its own PEM or DER file (nothing is downloaded): for KEK "Microsoft Corporation
KEK CA 2011" and its 2023 successor, for db "Microsoft Windows Production PCA 2011",
"Microsoft UEFI CA 2011" and their 2023 successors.

The .auth timestamp is SOURCE_DATE_EPOCH (default {auth_timestamp({})} UTC), so signing
the same keys again gives the same bytes. Firmware in user mode accepts a replacing
update only with a newer timestamp: set SOURCE_DATE_EPOCH when signing a later update.
"""
