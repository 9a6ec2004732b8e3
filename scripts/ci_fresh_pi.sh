#!/usr/bin/env bash
# The README's Raspberry Pi commands on fresh Debian arm64 systems, run as a Pi user runs them.
#
# For each suite (bookworm: Python 3.11, trixie: Python 3.13), a clean root made by mmdebstrap
# (minbase + scripts/fresh_pi/packages.txt) is entered with chroot; its programs run under qemu
# user mode through binfmt_misc, as a Pi 4 (cortex-a72) and then as a Pi 5 (cortex-a76)
# (scripts/arm64/pi_profiles.sh), user pi, in a fresh clone of this repository (its HEAD):
#   1. bash scripts/setup_rpi.sh            the full set-up, with TORCH_INDEX_URL= (pip's default
#                                           index; CI reaches no other, and on aarch64 it is CPU-only)
#   2. .venv/bin/python vim/infer_rpi.py    HF_ENDPOINT at a loopback stand-in of the Hub
#                                           (fresh_pi/fake_hub.py) holding a small random-weight
#                                           Vim-Tiny at the released file's path; a fresh Hub cache
#                                           on each Pi
#   3. .venv/bin/python vim/serve_rpi.py    until /readyz says 200, then one POST /v1/classify
# The Pi 5 runs set-up again on the venv the Pi 4 made (the kernels compile per CPU). Then, once
# per suite, setup_rpi.sh --system-site-packages and fresh_pi/check_system_site.py (apt's numpy
# and a C extension built against it, next to the OpenCV pip picked). The suites run side by side.
# Each step's wall and CPU time on the emulated Pi is logged.
#
# Usage: bash scripts/ci_fresh_pi.sh    (as root: it mounts, chroots, registers binfmt_misc)
#
# Cached outside the checkout: each suite's root, named by a hash of the suite, the mirrors, the
# package list, the mmdebstrap options and SCRIPT_VERSION (old ones are removed), and pip's
# download cache (its entries are checked by pip). A run works on an overlay of the cached root,
# inside private mount and PID namespaces: nothing stays mounted or running however it ends.
# The binfmt_misc entry (F flag: qemu is opened at registration, so it runs inside the roots)
# is removed at the end. Concurrent runs wait for each other.
#
# Environment:
#   VIM_FRESH_PI_CACHE        cache directory [~/.cache/vim-rpi-fresh-pi]
#   VIM_FRESH_PI_SUITES       [bookworm trixie]
#   VIM_FRESH_PI_PROFILES     [pi4 pi5]
#   VIM_FRESH_PI_HOST_PYTHON  a python with torch and vim_rpi, makes the weights [.venv/bin/python]
#   VIM_FRESH_PI_MIRROR       [http://deb.debian.org/debian]
#   VIM_FRESH_PI_SECURITY     [http://deb.debian.org/debian-security]
#
# Logs go to stderr. The last line, on stdout, is "fresh-pi: N passed, M failed (...)", counting
# each (suite, Pi) and each suite's --system-site-packages check; the exit status is non-zero
# when anything failed.

# shellcheck disable=SC2016  # $1 in mmdebstrap's hook is the hook's, not ours
set -euo pipefail

readonly SCRIPT_VERSION=1  # bump when a change here alters what goes into the cached roots
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly HERE=$REPO/scripts/fresh_pi
readonly CACHE=${VIM_FRESH_PI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vim-rpi-fresh-pi}
read -r -a SUITES <<<"${VIM_FRESH_PI_SUITES:-bookworm trixie}"
read -r -a PROFILES <<<"${VIM_FRESH_PI_PROFILES:-pi4 pi5}"
readonly SUITES PROFILES
readonly HOST_PY=${VIM_FRESH_PI_HOST_PYTHON:-$REPO/.venv/bin/python}
readonly MIRROR=${VIM_FRESH_PI_MIRROR:-http://deb.debian.org/debian}
readonly SECURITY=${VIM_FRESH_PI_SECURITY:-http://deb.debian.org/debian-security}
readonly QEMU=/usr/bin/qemu-aarch64-static
readonly BINFMT=/proc/sys/fs/binfmt_misc
readonly BINFMT_NAME=vim-rpi-fresh-pi
# ELF 64-bit little-endian, machine 183 (AArch64), executables and shared objects
readonly ELF_MAGIC='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
readonly ELF_MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
readonly PI_UID=1000
readonly CLONE=/home/pi/vim-rpi
readonly SETUP_LIMIT=3600  # seconds for one set-up under emulation
readonly RUN_LIMIT=900     # seconds for one infer_rpi.py run, or the server's whole step
readonly MMDEBSTRAP_OPTS=(
    --mode=root --arch=arm64 --variant=minbase
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --aptopt='Acquire::Retries "3"'
    --customize-hook='chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash pi'
)

log() { echo "fresh-pi: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Everything below runs in private mount and PID namespaces (the script re-executes itself
# there): mounts vanish and processes end with it, even when it is killed.
if [[ ${VIM_FRESH_PI_NAMESPACE:-} != 1 ]]; then
    ((EUID == 0)) || die "run as root: it mounts file systems, chroots and registers qemu with binfmt_misc"
    export VIM_FRESH_PI_NAMESPACE=1
    exec unshare --mount --pid --fork --kill-child=SIGTERM --propagation private --mount-proc \
        -- bash "${BASH_SOURCE[0]}" "$@"
fi

# shellcheck source=scripts/arm64/pi_profiles.sh
source "$REPO/scripts/arm64/pi_profiles.sh"  # the Pi profiles (PI_PROFILES, pi_cpu...) and the cache helpers

RUN=
registered=0
summary=()

on_exit() {
    local rc=$? suite passed=0 failed=0 line names
    if [[ -n $RUN ]]; then
        for suite in "${SUITES[@]}"; do
            if mountpoint -q "$RUN/$suite/root"; then umount -R -l "$RUN/$suite/root"; fi
        done
        rm -rf --one-file-system "$RUN"
    fi
    if ((registered)); then echo -1 >"$BINFMT/$BINFMT_NAME" || true; fi
    for line in "${summary[@]}"; do
        if [[ $line == *" PASS"* ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    done
    if ((rc != 0 && failed == 0)); then failed=1; fi  # a step that died before the checks
    names=$(printf '%s, ' "${SUITES[@]}")
    echo "fresh-pi: $passed passed, $failed failed (${names%, } on ${PROFILES[*]})"
    if ((failed > 0)); then exit 1; fi
}
trap on_exit EXIT
set -E
trap 'log "error: line $LINENO: $BASH_COMMAND exited with status $?"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_host_tools() {
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v arch-test >/dev/null || missing+=(arch-test)
    [[ -x $QEMU ]] || missing+=(qemu-user-static)
    [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
    command -v curl >/dev/null || missing+=(curl)
    command -v git >/dev/null || missing+=(git)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} with apt"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=600 "${missing[@]}" >&2
    fi
    "$HOST_PY" -c 'import torch, vim_rpi' 2>/dev/null \
        || die "$HOST_PY cannot import torch and vim_rpi: set VIM_FRESH_PI_HOST_PYTHON to one that can (the README's test venv)"
}

# aarch64 programs run under qemu in any root: an entry with the F flag holds qemu open.
register_binfmt() {
    if [[ ! -e $BINFMT/register ]]; then
        mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc on $BINFMT"
    fi
    # A leftover of a killed run (runs are serialised by the cache lock).
    if [[ -e $BINFMT/$BINFMT_NAME ]]; then echo -1 >"$BINFMT/$BINFMT_NAME"; fi
    printf ':%s:M::%s:%s:%s:F\n' "$BINFMT_NAME" "$ELF_MAGIC" "$ELF_MASK" "$QEMU" >"$BINFMT/register"
    registered=1
}

sources() {
    printf 'deb %s %s main\n' "$MIRROR" "$1" "$MIRROR" "$1-updates" "$SECURITY" "$1-security"
}

root_name() {
    local key
    key=$({ echo "$SCRIPT_VERSION $1"; sources "$1"; package_list "$HERE/packages.txt"; printf '%s\n' "${MMDEBSTRAP_OPTS[@]}"; } \
        | sha256sum | cut -c1-16)
    echo "root-$1-$key"
}

build_root() {
    local suite=$1 dest=$2 work started=$SECONDS
    local -a lines
    work=$(mktemp -d "$CACHE/.build-$suite.XXXXXX")
    mapfile -t lines < <(sources "$suite")
    log "$suite: building the root (mmdebstrap)"
    if ! mmdebstrap "${MMDEBSTRAP_OPTS[@]}" --include="$(package_list "$HERE/packages.txt" | paste -sd, -)" \
        "$suite" "$work/root" "${lines[@]}" >"$work/log" 2>&1; then
        tail -n 30 "$work/log" >&2
        die "$suite: mmdebstrap failed (above)"
    fi
    mv "$work/root" "$dest"
    rm -rf "$work"
    log "$suite: root built in $((SECONDS - started)) s"
}

# The weights infer_rpi.py fetches by default, at the path the Hub serves them from: the
# released layout (save_checkpoint) of a Vim-Tiny with random weights, 2 blocks of width 64 in
# the place of 24 of width 192 (as tests/test_hub.py): under emulation a forward of the full
# model takes ~35 s, and the server's step needs two.
make_weights() {
    "$HOST_PY" - "$1" <<'EOF'
import os, sys, torch
import vim_rpi
from vim_rpi import checkpoint_io, factory, hub, registry

owner, repo, name = factory.default_checkpoint()[len(hub.HUB_PREFIX):].split("/", 2)
torch.manual_seed(0)
model = vim_rpi.create_model(registry.DEFAULT_MODEL, depth=2, embed_dim=64)
checkpoint_io.save_checkpoint(os.path.join(sys.argv[1], owner, repo, name), model)
EOF
}

# An overlay of the cached root with what each step needs: a clone, the pip cache, /sys, the
# Pis' identities (/run/qemu-PROFILE), the host's resolver and CA bundle (a proxy's CA).
prepare_suite() {
    local suite=$1 dir=$RUN/$1 profile
    local root=$dir/root
    mkdir -p "$dir/upper" "$dir/work" "$root"
    mount -t overlay overlay -o "lowerdir=$CACHE/$(root_name "$suite"),upperdir=$dir/upper,workdir=$dir/work" "$root"
    git clone --quiet --no-local "$REPO" "$root$CLONE"
    chown -R "$PI_UID:$PI_UID" "$root$CLONE"
    mkdir -p "$root/home/pi/.cache/pip"
    chown "$PI_UID:$PI_UID" "$root/home/pi/.cache" "$root/home/pi/.cache/pip"
    mount --bind "$CACHE/pip" "$root/home/pi/.cache/pip"
    mount --rbind /sys "$root/sys"
    for profile in "${PROFILES[@]}"; do write_pi_identity "$root/run/qemu-$profile" "$profile"; done
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
}

# guest_command SUITE PROFILE LIMIT COMMAND: sets $cmd to run COMMAND in bash as user pi in the
# clone, as PROFILE's Pi, in its own mount and PID namespaces (whatever it starts ends with it,
# also when timeout or a kill ends it).
guest_command() {
    local suite=$1 profile=$2 limit=$3 command=$4
    local root=$RUN/$suite/root
    cmd=(timeout -k 10 "$limit" unshare --mount --pid --fork --kill-child --mount-proc="$root/proc" --
        chroot --userspec="$PI_UID:$PI_UID" "$root" /usr/bin/env -i HOME=/home/pi USER=pi LOGNAME=pi
        LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin TERM=dumb
        QEMU_CPU="$(pi_cpu "$profile")" QEMU_LD_PREFIX="/run/qemu-$profile"
        TORCH_INDEX_URL= HF_ENDPOINT="http://127.0.0.1:$(cat "$RUN/$suite/hub.port")"
        /bin/bash -c "cd $CLONE && $command")
}

# $cpu_used: CPU seconds (user + system) used so far by this shell's waited-for children.
# (times must run in this shell, not in a command substitution's.)
children_cpu() {
    local file=$RUN/.times.$BASHPID  # named here: in $(...) BASHPID is another process's
    times >"$file"
    cpu_used=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); t += p[1] * 60 + p[2] }; printf "%.0f", t }' "$file")
}

# timed SUITE PROFILE NAME LIMIT COMMAND: a guest step with its time logged; its status in $rc,
# its wall and CPU time in $step_time.
timed() {
    local suite=$1 profile=$2 name=$3 limit=$4 command=$5 started=$SECONDS cpu_used cpu_before
    local -a cmd
    guest_command "$suite" "$profile" "$limit" "$command"
    children_cpu
    cpu_before=$cpu_used
    rc=0
    "${cmd[@]}" >"$RUN/$suite/$profile-$name.log" 2>&1 || rc=$?
    children_cpu
    step_time="$((SECONDS - started)) s, cpu $((cpu_used - cpu_before)) s"
    log "$suite/$profile: $name: exit $rc, $step_time"
}

# Entries of the fused kernels' cache (one per CPU and numba version) in the clone.
kernel_entries() {
    local dir=$RUN/$1/root$CLONE/mamba-1p1p1/mamba_ssm/ops/__pycache__
    if [[ -d $dir ]]; then find "$dir" -maxdepth 1 -name '*.kernels' | wc -l; else echo 0; fi
}

hub_gets() {
    grep -c '^GET /.*/resolve/.* 200$' "$RUN/$1/hub.log" || true
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The server step: start it, wait for /readyz (it loads the model and warms up), one POST.
serve() {
    local suite=$1 profile=$2 port pid started=$SECONDS deadline out=$RUN/$1/$2-classify.json
    local -a cmd
    port=$(free_port)
    guest_command "$suite" "$profile" "$RUN_LIMIT" "exec .venv/bin/python vim/serve_rpi.py --port $port"
    "${cmd[@]}" >"$RUN/$suite/$profile-serve.log" 2>&1 &
    pid=$!  # timeout's: ending it ends the server's namespace
    deadline=$((SECONDS + RUN_LIMIT - 60))
    until curl -sf -o /dev/null --max-time 10 "http://127.0.0.1:$port/readyz"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then break; fi
        sleep 2
    done
    ready="$((SECONDS - started)) s"
    started=$SECONDS
    status=$(curl -s -o "$out" -w '%{http_code}' --max-time 300 --data-binary @"$REPO/vim/data/sample.jpg" \
        "http://127.0.0.1:$port/v1/classify" || true)
    log "$suite/$profile: serve: ready after $ready, POST /v1/classify answered $status in $((SECONDS - started)) s"
    kill "$pid" 2>/dev/null || true
    wait "$pid" || true
}

# One (suite, Pi): the two README commands and the server; a summary line in $RUN/SUITE/summary.
run_pair() {
    local suite=$1 profile=$2 dir=$RUN/$1 verdict=PASS line rc step_time status ready
    local setup_time infer_time smoke checked entries top5 numba fetched identity
    # What the guest sees: an aarch64 machine, the Pi's board (through QEMU_LD_PREFIX).
    timed "$suite" "$profile" identity 120 'echo "$(uname -m), $(tr -d "\0" </proc/device-tree/model)"'
    identity=$(cat "$dir/$profile-identity.log")
    line="$identity, $(pi_cpu "$profile"); "
    [[ $identity == "aarch64, $(pi_model "$profile")" ]] || verdict=FAIL
    entries=$(kernel_entries "$suite")
    timed "$suite" "$profile" set-up "$SETUP_LIMIT" 'bash scripts/setup_rpi.sh'
    setup_time=$step_time
    line+="set-up exit $rc ($setup_time)"
    ((rc == 0)) || verdict=FAIL
    smoke=$(grep -m1 '^ok: torch' "$dir/$profile-set-up.log" || true)
    if [[ -n $smoke ]]; then line+=", smoke test ok"; else line+=", NO smoke test line"; verdict=FAIL; fi
    # kernel_check's line, and a new cache entry: compiled here, for this CPU
    checked=$(grep -m1 '^ok: the fused numba kernels' "$dir/$profile-set-up.log" || true)
    if [[ -n $checked ]] && (($(kernel_entries "$suite") > entries)); then
        line+=", numba kernels compiled for this CPU and checked"
    else
        line+=", NO numba kernels compiled and checked"
        verdict=FAIL
    fi

    fetched=$(hub_gets "$suite")
    timed "$suite" "$profile" infer "$RUN_LIMIT" 'rm -rf ~/.cache/huggingface && .venv/bin/python vim/infer_rpi.py'
    infer_time=$step_time
    top5=$(grep -cE '^ +[1-5] +[0-9.]+% ' "$dir/$profile-infer.log" || true)
    numba=$(grep -c ', scan numba' "$dir/$profile-infer.log" || true)
    if ((rc == 0 && top5 == 5 && numba == 1 && $(hub_gets "$suite") > fetched)); then
        line+="; infer_rpi.py: weights fetched through HF_ENDPOINT, top-5, fused numba kernels ($infer_time)"
    else
        line+="; infer_rpi.py FAILED (exit $rc, $top5 top-5 rows, numba reported $numba times)"
        verdict=FAIL
    fi

    serve "$suite" "$profile"
    if [[ $status == 200 ]] && grep -q '"topk"' "$RUN/$suite/$profile-classify.json"; then
        line+="; serve_rpi.py: 200 (ready after $ready)"
    else
        line+="; serve_rpi.py answered ${status:-nothing}"
        verdict=FAIL
    fi
    echo "$suite/$profile $verdict: $line" >>"$dir/summary"
}

# setup_rpi.sh --system-site-packages on the venv the plain runs made, then the check.
run_system_site() {
    local suite=$1 profile=$2 dir=$RUN/$1 rc step_time verdict=FAIL line
    timed "$suite" "$profile" system-site "$SETUP_LIMIT" 'bash scripts/setup_rpi.sh --system-site-packages'
    line="set-up --system-site-packages exit $rc ($step_time)"
    if ((rc == 0)); then
        timed "$suite" "$profile" system-site-check 600 '.venv/bin/python scripts/fresh_pi/check_system_site.py'
        line+="; $(tail -n 1 "$dir/$profile-system-site-check.log")"
        if ((rc == 0)); then verdict=PASS; fi
    fi
    echo "$suite/system-site $verdict: $line" >>"$dir/summary"
}

run_suite() {
    local suite=$1 profile
    python3 "$HERE/fake_hub.py" "$RUN/hub" "$RUN/$suite/hub.port" >"$RUN/$suite/hub.log" 2>&1 &
    for _ in {1..100}; do [[ -s $RUN/$suite/hub.port ]] && break; sleep 0.1; done
    [[ -s $RUN/$suite/hub.port ]] || die "$suite: the stand-in Hub did not start: $(cat "$RUN/$suite/hub.log")"
    for profile in "${PROFILES[@]}"; do run_pair "$suite" "$profile"; done
    run_system_site "$suite" "${PROFILES[-1]}"
}

show() {
    if [[ -e $1 ]]; then cat "$1" >&2; fi
}

# What the set-up printed that matters: its steps, the smoke test; all of it when it failed.
show_setup() {
    if grep -q '^ok: torch' "$1" 2>/dev/null; then
        grep -E '^(==|ok:|note:|keeping|warning|error|setup_rpi.sh:|Successfully installed)' "$1" >&2 || true
    else
        show "$1"
    fi
}

show_suite() {
    local suite=$1 dir=$RUN/$1 profile
    for profile in "${PROFILES[@]}"; do
        log "$suite/$profile: bash scripts/setup_rpi.sh"
        show_setup "$dir/$profile-set-up.log"
        log "$suite/$profile: .venv/bin/python vim/infer_rpi.py"
        show "$dir/$profile-infer.log"
        log "$suite/$profile: .venv/bin/python vim/serve_rpi.py (the end of its log, then the answer)"
        if [[ -e $dir/$profile-serve.log ]]; then tail -n 15 "$dir/$profile-serve.log" >&2; fi
        show "$dir/$profile-classify.json"
        echo >&2
    done
    profile=${PROFILES[-1]}
    log "$suite: bash scripts/setup_rpi.sh --system-site-packages; scripts/fresh_pi/check_system_site.py"
    show_setup "$dir/$profile-system-site.log"
    show "$dir/$profile-system-site-check.log"
}

main() {
    local suite started=$SECONDS
    local -A pids=()
    check_profiles "${PROFILES[@]}"
    if ((${#PROFILES[@]} == 0 || ${#SUITES[@]} == 0)); then die "no suites or no profiles to run"; fi
    mkdir -p "$CACHE/pip"
    chown "$PI_UID:$PI_UID" "$CACHE/pip"
    ensure_host_tools
    lock_cache "$CACHE"
    RUN=$(mktemp -d "${TMPDIR:-/tmp}/vim-fresh-pi.XXXXXX")
    chmod 755 "$RUN"
    register_binfmt
    log "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) CPUs, load$(uptime | sed 's/.*load average//')"
    make_weights "$RUN/hub"

    for suite in "${SUITES[@]}"; do
        if [[ ! -d $CACHE/$(root_name "$suite") ]]; then
            build_root "$suite" "$CACHE/$(root_name "$suite")" &
            pids[$suite]=$!
        fi
    done
    for suite in "${!pids[@]}"; do
        wait "${pids[$suite]}" || die "$suite: building the root failed"
        prune_cache "$CACHE" "root-$suite" "$(root_name "$suite")"
    done
    pids=()
    for suite in "${SUITES[@]}"; do
        log "$suite: root $CACHE/$(root_name "$suite")"
        prepare_suite "$suite"
        run_suite "$suite" &
        pids[$suite]=$!
    done
    for suite in "${SUITES[@]}"; do
        wait "${pids[$suite]}" || log "$suite: the run ended with status $?"
    done
    for suite in "${SUITES[@]}"; do
        show_suite "$suite"
        if [[ -s $RUN/$suite/summary ]]; then mapfile -t -O "${#summary[@]}" summary <"$RUN/$suite/summary"; fi
    done
    local expected=$((${#SUITES[@]} * (${#PROFILES[@]} + 1)))
    while ((${#summary[@]} < expected)); do summary+=("(a check that did not run) FAIL"); done
    log "summary (wall and CPU seconds on the emulated Pi; the whole check took $((SECONDS - started)) s)"
    printf 'fresh-pi:   %s\n' "${summary[@]}" >&2
}

main "$@"
