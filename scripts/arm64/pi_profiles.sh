# shellcheck shell=bash
# What an emulated Raspberry Pi reports about itself, and how a run holds and prunes its cache
# and reads its package lists, for scripts/ci_arm64.sh and scripts/ci_fresh_pi.sh (sourced, bash). The qemu CPU model sets the instructions and the
# hardware capabilities; the files written by write_pi_identity give what programs read from
# /proc and /sys (torch's cpuinfo, LLVM's host CPU name and features), which under qemu user
# mode would otherwise be the x86 host's. qemu looks an absolute path up under QEMU_LD_PREFIX
# first, so a directory holding only these files, given as QEMU_LD_PREFIX, overlays them.

# shellcheck disable=SC2034  # used by the scripts that source this file
# profile -> qemu CPU model | MIDR_EL1 | /proc/cpuinfo Features | device-tree model | board revision
declare -A PI_PROFILES=(
    [pi4]="cortex-a72|0x410fd083|fp asimd evtstrm crc32 cpuid|Raspberry Pi 4 Model B Rev 1.4|d03114"
    [pi5]="cortex-a76|0x414fd0b1|fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp|Raspberry Pi 5 Model B Rev 1.0|d04170"
)

# check_profiles NAME...: die (the sourcing script's) unless every NAME is a known profile.
check_profiles() {
    local name
    for name in "$@"; do
        [[ -n ${PI_PROFILES[$name]:-} ]] || die "unknown profile '$name' (known: ${!PI_PROFILES[*]})"
    done
}

# pi_cpu PROFILE: the qemu CPU model (QEMU_CPU) of a profile.
pi_cpu() {
    echo "${PI_PROFILES[$1]%%|*}"
}

# pi_model PROFILE: the board, as /proc/device-tree/model names it.
pi_model() {
    local cpu midr features model revision
    IFS='|' read -r cpu midr features model revision <<<"${PI_PROFILES[$1]}"
    echo "$model"
}

# write_pi_identity DIR PROFILE: DIR/proc/cpuinfo (one entry per host CPU, as many as the
# emulated process can run on), DIR/sys/devices/system/cpu/cpuN/regs/identification/midr_el1 and
# DIR/proc/device-tree/model of that Pi.
write_pi_identity() {
    local dir=$1 cpu midr features model revision ncpu i
    IFS='|' read -r cpu midr features model revision <<<"${PI_PROFILES[$2]}"
    ncpu=$(nproc --all)
    mkdir -p "$dir/proc/device-tree"
    for ((i = 0; i < ncpu; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\n' "$i" "$features"
        printf 'CPU implementer\t: 0x%02x\nCPU architecture: 8\nCPU variant\t: 0x%x\n' \
            $((midr >> 24 & 0xff)) $((midr >> 20 & 0xf))
        printf 'CPU part\t: 0x%03x\nCPU revision\t: %d\n\n' $((midr >> 4 & 0xfff)) $((midr & 0xf))
        mkdir -p "$dir/sys/devices/system/cpu/cpu$i/regs/identification"
        printf '0x%016x\n' $((midr)) >"$dir/sys/devices/system/cpu/cpu$i/regs/identification/midr_el1"
    done >"$dir/proc/cpuinfo"
    printf 'Revision\t: %s\nSerial\t\t: 10000000c0ffee00\nModel\t\t: %s\n' \
        "$revision" "$model" >>"$dir/proc/cpuinfo"
    printf '%s\0' "$model" >"$dir/proc/device-tree/model"
}

# lock_cache DIR: one run at a time per cache directory (builds are renamed into place and old
# entries pruned), holding fd 9 until the script exits; then clear what an interrupted build left.
lock_cache() {
    exec 9>"$1/.lock"
    if ! flock -n 9; then
        log "waiting for another $(basename "$0") run to finish"
        flock 9
    fi
    rm -rf "$1"/.build-*
}

# prune_cache DIR FAMILY KEEP: remove the entries DIR/FAMILY-* but DIR/KEEP, so old builds do not
# pile up.
prune_cache() {
    local entry
    for entry in "$1/$2"-*; do
        if [[ -e $entry && $entry != "$1/$3" ]]; then rm -rf "$entry"; fi
    done
}

# package_list FILE: the package names FILE lists (comments and blank lines dropped).
package_list() {
    sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$1"
}
