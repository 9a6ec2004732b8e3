#!/usr/bin/env bash
# Emulated Raspberry Pi checks: run our code on the Pi's software stack (Debian bookworm arm64,
# Python 3.11, CPU-only aarch64 torch/torchvision/timm wheels from PyPI) under qemu user mode,
# once as a Pi 4 (cortex-a72) and once as a Pi 5 (cortex-a76).
#
# Usage: bash scripts/ci_arm64.sh [PYTEST_ARGS...]
#   e.g. bash scripts/ci_arm64.sh -k preprocess -x   (extra arguments go to the guest's pytest)
#
# The arm64 root (Debian packages unpacked with dpkg -x) and the wheels are cached outside the
# checkout, each under a name derived from its inputs, so editing the package or pin list
# rebuilds it. Nothing is installed into the host's Python or dpkg database; root (or sudo) is
# needed only to apt-get install qemu-user-static when it is missing.
#
# Environment:
#   VIM_ARM64_CACHE     cache directory (default: ~/.cache/vim-rpi-arm64)
#   VIM_ARM64_TIMEOUT   seconds allowed for each CPU profile (default: 600)
#   VIM_ARM64_PROFILES  profiles to run (default: "pi4 pi5")
#   VIM_ARM64_HOST_PYTHON  host python with pip (default: python3); if it is 3.11 it also
#                       precompiles the wheels, otherwise the emulated python does (slower)
#
# Logs go to stderr. The last line, on stdout, is "arm64: N passed, M failed (pi4, pi5)";
# the exit status is non-zero when anything failed. Concurrent runs wait for each other.

# shellcheck disable=SC2016  # $(...) and ${...} in apt/dpkg formats and the wrapper are literal
set -euo pipefail

readonly SCRIPT_VERSION=1  # bump when a change here alters what goes into the cache
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly HERE=$REPO/scripts/arm64
readonly CACHE=${VIM_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vim-rpi-arm64}
readonly TIMEOUT=${VIM_ARM64_TIMEOUT:-600}
read -r -a PROFILES <<<"${VIM_ARM64_PROFILES:-pi4 pi5}"
readonly PROFILES
readonly PY=${VIM_ARM64_HOST_PYTHON:-python3}
readonly QEMU=qemu-aarch64-static
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
readonly GUEST_PYTHON=usr/bin/python3.11

# shellcheck source=scripts/arm64/pi_profiles.sh
source "$HERE/pi_profiles.sh"  # the Pi profiles (PI_PROFILES, pi_cpu...) and the cache helpers

passed=0
failed=0
RUN=
started_pid=
jobs_started=()

log() { echo "ci_arm64: $*" >&2; }
die() { log "error: $*"; exit 1; }

on_exit() {
    local rc=$? pid
    for pid in "${jobs_started[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -n $RUN ]]; then rm -rf "$RUN"; fi
    # A step that died before the checks ran still has to show up as a failure.
    if ((rc != 0 && failed == 0)); then failed=1; fi
    local names
    names=$(IFS=,; echo "${PROFILES[*]}")
    echo "arm64: $passed passed, $failed failed (${names//,/, })"
    if ((failed > 0)); then exit 1; fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

as_root() {
    if ((EUID == 0)); then "$@"; else sudo "$@"; fi
}

ensure_host_tools() {
    local missing=()
    command -v "$QEMU" >/dev/null || missing+=(qemu-user-static)
    [[ -r $KEYRING ]] || missing+=(debian-archive-keyring)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} with apt"
        as_root apt-get update -q >&2
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this script needs a Debian-based host"
    "$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work: set VIM_ARM64_HOST_PYTHON to a python with pip"
}

# Short content hash of the script version and the given files: the cache entry's name.
cache_key() {
    { echo "$SCRIPT_VERSION"; cat "$@"; } | sha256sum | cut -c1-16
}

# The host's own bookworm repositories (URI suite per line), with arm64 pinned; the official
# mirror when the host does not use bookworm.
arm64_sources() {
    local lines
    lines=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk '$2 ~ /^bookworm(-updates|-security)?$/' | sort -u || true)
    if [[ -z $lines ]]; then
        lines=$'http://deb.debian.org/debian/ bookworm\nhttp://deb.debian.org/debian/ bookworm-updates\nhttp://deb.debian.org/debian-security/ bookworm-security'
    fi
    awk -v keyring="$KEYRING" \
        '{ printf "deb [arch=arm64 signed-by=%s] %s %s main\n", keyring, $1, $2 }' <<<"$lines"
}

# Run the sysroot's python directly (no wrapper yet): used while building the cache.
raw_guest_python() {
    local root=$1
    shift
    QEMU_LD_PREFIX=$root QEMU_CPU=cortex-a72 PYTHONNOUSERSITE=1 "$QEMU" "$root/$GUEST_PYTHON" "$@"
}

build_sysroot() {
    local dest=$1 sources=$2 work
    work=$(mktemp -d "$CACHE/.build-sysroot.XXXXXX")
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
    cp "$sources" "$work/sources.list"
    # A private apt state: arm64 indexes only, no host status, so nothing touches host dpkg.
    local apt_opts=(
        -o APT::Architecture=arm64 -o APT::Architectures=arm64
        -o Dir::State::Lists="$work/lists" -o Dir::State::status=/dev/null
        -o Dir::Cache="$work/cache" -o Dir::Etc::SourceList="$work/sources.list"
        -o Dir::Etc::SourceParts=/dev/null -o Dir::Etc::Preferences=/dev/null
        -o Dir::Etc::PreferencesParts=/dev/null -o Acquire::Languages=none
        -o APT::Sandbox::User="$(id -un)"
    )
    log "fetching Debian bookworm arm64 packages"
    apt-get "${apt_opts[@]}" -qq update >&2
    local packages
    mapfile -t packages < <(package_list "$HERE/sysroot-packages.txt")
    (cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}" >&2)
    local deb
    for deb in "$work"/debs/*.deb; do
        dpkg -x "$deb" "$work/root"
        dpkg-deb --show --showformat='${Package} ${Version}\n' "$deb" >>"$work/root/.packages"
    done
    raw_guest_python "$work/root" -c 'import bz2, ctypes, lzma, sqlite3, ssl, zlib' \
        || die "the arm64 python in the new sysroot does not start (see above)"
    mv "$work/root" "$dest"
    rm -rf "$work"
}

build_site() {
    local dest=$1 sysroot=$2 work platforms=(--platform manylinux2014_aarch64) glibc
    work=$(mktemp -d "$CACHE/.build-site.XXXXXX")
    # Every manylinux tag bookworm's glibc 2.36 accepts.
    for glibc in {17..36}; do platforms+=(--platform "manylinux_2_${glibc}_aarch64"); done
    log "installing aarch64 wheels"
    "$PY" -m pip install -qq --disable-pip-version-check --no-deps --only-binary=:all: \
        "${platforms[@]}" --python-version 3.11 --implementation cp \
        --require-hashes --no-compile --target "$work/site" \
        -r "$HERE/requirements-aarch64.txt" >&2
    log "precompiling .pyc files"
    # Timestamp-checked .pyc; a few files are not Python 3.11 source (templates, test data),
    # and compileall names them, so its status is not an error here.
    if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        "$PY" -m compileall -q -j0 "$work/site" >/dev/null || true
    else
        raw_guest_python "$sysroot" -m compileall -q "$work/site" >/dev/null || true
    fi
    mv "$work/site" "$dest"
    rm -rf "$work"
}

# Per-profile root for QEMU_LD_PREFIX: the shared sysroot plus a Pi's /proc/cpuinfo, MIDR
# registers and device-tree model (see pi_profiles.sh).
make_profile_root() {
    local root=$1 sysroot=$2 profile=$3 entry
    mkdir -p "$root"
    for entry in "$sysroot"/*; do ln -s "$entry" "$root/"; done
    write_pi_identity "$root" "$profile"
}

# The aarch64 "python" for one profile: a host script that runs the guest interpreter under
# qemu. sitecustomize points sys.executable here, so guest subprocesses work without binfmt.
write_wrapper() {
    local wrapper=$1 root=$2 sysroot=$3 site=$4 cpu=$5 name=$6 pythonpath
    # vim_rpi is the vim/ directory under the package's own name (pip install -e . maps it so)
    pythonpath=$HERE/guest-site:$site:$REPO/causal-conv1d:$REPO/mamba-1p1p1:$RUN/python
    {
        echo '#!/usr/bin/env bash'
        echo "# aarch64 python 3.11 as profile $name ($cpu) under qemu user mode (ci_arm64.sh)"
        printf 'export QEMU_LD_PREFIX=%q QEMU_CPU=%q\n' "$root" "$cpu"
        printf 'export VIM_ARM64_PYTHON=%q VIM_ARM64_PROFILE=%q\n' "$wrapper" "$name"
        printf 'export PYTHONPATH=%q${PYTHONPATH:+:$PYTHONPATH}\n' "$pythonpath"
        echo 'export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1'
        # numba's compiled kernels for this profile's CPU, shared by its guest processes
        printf 'export NUMBA_CACHE_DIR=%q\n' "$root/../numba-cache"
        printf 'exec %q %q "$@"\n' "$(command -v "$QEMU")" "$sysroot/$GUEST_PYTHON"
    } >"$wrapper"
    chmod +x "$wrapper"
}

# Add one profile's pytest results to the totals; a crash (SIGILL at import, timeout) that
# leaves no report counts as one failure.
count_results() {
    local name=$1 report=$2 rc=$3 counts p f
    if [[ ! -s $report ]]; then
        log "$name: the emulated pytest run ended with status $rc and no report"
        failed=$((failed + 1))
        return
    fi
    counts=$("$PY" - "$report" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suites = ET.parse(sys.argv[1]).getroot().iter("testsuite")
total = bad = 0
for suite in suites:
    total += int(suite.get("tests", 0))
    # Nothing here may skip: a skipped check proves nothing about the Pi stack.
    bad += sum(int(suite.get(key, 0)) for key in ("failures", "errors", "skipped"))
print(total - bad, bad)
EOF
    )
    read -r p f <<<"$counts"
    if ((rc != 0 && f == 0)); then
        log "$name: pytest exited with status $rc"
        f=1
    fi
    log "$name: $p passed, $f failed"
    passed=$((passed + p))
    failed=$((failed + f))
}

# Set up one profile and start its checks in the background (pid in $started_pid).
start_profile() {
    local name=$1 sysroot=$2 site=$3 cpu model dir
    cpu=$(pi_cpu "$name")
    model=$(pi_model "$name")
    dir=$RUN/$name
    mkdir -p "$dir"
    make_profile_root "$dir/root" "$sysroot" "$name"
    write_wrapper "$dir/python3" "$dir/root" "$sysroot" "$site" "$cpu" "$name"
    log "$name: running the checks as a $model ($cpu)"
    (cd "$dir" && exec timeout -k 10 "$TIMEOUT" "$dir/python3" -m pytest \
        -q -rfEs --durations=5 -p no:cacheprovider --noconftest -c /dev/null \
        --rootdir "$REPO/tests/arm64" -o python_files='check_*.py' --basetemp "$dir/tmp" \
        --junitxml "$dir/report.xml" "${PYTEST_ARGS[@]}" "$REPO/tests/arm64") >"$dir/log" 2>&1 &
    started_pid=$!
    jobs_started+=("$started_pid")
}

# The profiles run side by side: emulated Python is mostly single-threaded, so this nearly
# halves the wall time on a multi-core host. Their logs are shown once each has finished.
run_profiles() {
    local sysroot=$1 site=$2 name rc
    local -A pids
    for name in "${PROFILES[@]}"; do
        start_profile "$name" "$sysroot" "$site"
        pids[$name]=$started_pid
    done
    for name in "${PROFILES[@]}"; do
        rc=0
        wait "${pids[$name]}" || rc=$?
        log "$name: output of the emulated pytest run"
        cat "$RUN/$name/log" >&2
        count_results "$name" "$RUN/$name/report.xml" "$rc"
    done
}

main() {
    check_profiles "${PROFILES[@]}"
    mkdir -p "$CACHE"
    ensure_host_tools
    lock_cache "$CACHE"

    RUN=$(mktemp -d "${TMPDIR:-/tmp}/vim-arm64.XXXXXX")
    mkdir "$RUN/python"
    ln -s "$REPO/vim" "$RUN/python/vim_rpi"
    arm64_sources >"$RUN/sources.list"
    package_list "$HERE/sysroot-packages.txt" >"$RUN/packages"

    local sysroot_name site_name
    sysroot_name=sysroot-$(cache_key "$RUN/packages" "$RUN/sources.list")
    site_name=site-$(cache_key "$HERE/requirements-aarch64.txt")
    if [[ ! -d $CACHE/$sysroot_name ]]; then
        build_sysroot "$CACHE/$sysroot_name" "$RUN/sources.list"
        prune_cache "$CACHE" sysroot "$sysroot_name"
    fi
    if [[ ! -d $CACHE/$site_name ]]; then
        build_site "$CACHE/$site_name" "$CACHE/$sysroot_name"
        prune_cache "$CACHE" site "$site_name"
    fi
    log "sysroot $CACHE/$sysroot_name, wheels $CACHE/$site_name"

    run_profiles "$CACHE/$sysroot_name" "$CACHE/$site_name"
}

PYTEST_ARGS=("$@")
main
