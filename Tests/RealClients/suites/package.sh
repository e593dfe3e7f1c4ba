# package suite (sourced by ci.sh): Deploy/package-deb.sh builds the .deb (release, static Swift runtime);
# it is installed into a clean Debian bookworm minbase chroot (Tests/RealClients/chroot/make-bookworm-chroot.sh, used
# through an overlay so the cached tree stays clean) with `apt-get install ./scsigate_*.deb`, which pulls
# the dependencies from the mirror. There: `scsigate version`, `scsigate check-config` (built-in default and
# the installed /etc/scsigate/scsigate.toml), ldd finds every library, the files (units, man page,
# completions) are in place, `dpkg -r` keeps the conffile and `dpkg --purge` removes it.
REGISTERED_SUITES+=(package)

suite_package() {
    DIR="$WORK/package"; mkdir -p "$DIR"
    local t0 deb base version
    t0=$(date +%s)
    deb=$(bash "$ROOT/Deploy/package-deb.sh" --output "$DIR" | tail -1) && [ -f "$deb" ]
    check "package .deb built: ${deb##*/} ($(du -h "$deb" 2>/dev/null | cut -f1))" $? || return
    echo "[package] $(dpkg-deb -f "$deb" Depends | sed 's/^/Depends: /')"
    base=$(bash "$ROOT/Tests/RealClients/chroot/make-bookworm-chroot.sh"); check "package clean bookworm chroot (cached)" $? || return
    version=$(dpkg-deb -f "$deb" Version)
    mkdir -p "$DIR/upper" "$DIR/work" "$DIR/root"
    # One private mount namespace for the overlay and the chroot's /proc and /dev: they vanish with it.
    unshare --mount --propagation private bash -s "$base" "$DIR" "$deb" "$version" > "$DIR/install.log" 2>&1 <<'INNER'
set -u
base=$1 dir=$2 deb=$3 version=$4 root=$2/root
res() { echo "PKG-CHECK rc=$1 $2"; }
mount -t overlay overlay -o "lowerdir=$base,upperdir=$dir/upper,workdir=$dir/work" "$root" || { res 1 "overlay mount"; exit 1; }
mount -t proc proc "$root/proc"; mount --rbind /dev "$root/dev"
cp "$deb" "$root/tmp/"
c() { chroot "$root" "$@"; }
# GNU chroot starts in the new root's /, so ./tmp/X.deb is the copy made above; stale lists: update, retry.
inst() { c env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y --no-install-recommends "./tmp/${deb##*/}"; }
inst || { c apt-get -o Acquire::Retries=3 update -qq && inst; }
res $? "apt-get install ./${deb##*/} in the clean chroot (dependencies from the mirror)"
echo "installed: $(c dpkg-query -W -f='${Package} ${Version} ${Status}' scsigate)"
out=$(c scsigate version); echo "$out"
[ "$out" = "scsigate $version" ]; res $? "scsigate version in the chroot prints 'scsigate $version'"
c scsigate check-config | tail -3; res "${PIPESTATUS[0]}" "scsigate check-config (built-in default) in the chroot"
c scsigate check-config /etc/scsigate/scsigate.toml | tail -1; res "${PIPESTATUS[0]}" "scsigate check-config /etc/scsigate/scsigate.toml (the packaged conffile)"
c ldd /usr/bin/scsigate | tee "$dir/ldd.txt" | grep -E 'not found|libswift|libFoundation'; [ $? = 1 ] && [ -s "$dir/ldd.txt" ]
res $? "ldd /usr/bin/scsigate in the chroot: every library found, no Swift runtime library"
c dpkg-query -W -f='${Conffiles}\n' scsigate | grep '^ /etc/scsigate/scsigate.toml ' >/dev/null; res $? "/etc/scsigate/scsigate.toml registered as a conffile"
missing=""
for f in /usr/bin/scsigate /lib/systemd/system/scsigate.service /usr/share/man/man1/scsigate.1.gz \
    /usr/share/bash-completion/completions/scsigate /usr/share/zsh/vendor-completions/_scsigate \
    /usr/share/fish/vendor_completions.d/scsigate.fish /usr/share/scsigate/libvirt/render.sh; do
    [ -s "$root$f" ] || missing="$missing $f"
done
[ -z "$missing" ]; res $? "installed files in place (binary, unit, man page, bash/zsh/fish completions, libvirt templates)${missing:+; missing:$missing}"
grep -q '^ExecStart=/usr/bin/scsigate serve' "$root/lib/systemd/system/scsigate.service"; res $? "scsigate.service runs /usr/bin/scsigate"
zcat "$root/usr/share/man/man1/scsigate.1.gz" | grep '^\.SS scsigate lun add' >/dev/null; res $? "man page documents the subcommands (scsigate lun add ...)"
c bash -c '. /usr/share/bash-completion/completions/scsigate && complete -p scsigate' ; res $? "bash completion loads and registers scsigate"
c dpkg -r scsigate >/dev/null && [ -f "$root/etc/scsigate/scsigate.toml" ] && [ ! -e "$root/usr/bin/scsigate" ]
res $? "dpkg -r removes the binary and keeps the conffile"
c dpkg --purge scsigate >/dev/null && [ ! -e "$root/etc/scsigate/scsigate.toml" ]; res $? "dpkg --purge removes the conffile"
INNER
    local line n=0
    while read -r line; do
        n=$((n + 1))
        local rc=${line#PKG-CHECK rc=}; rc=${rc%% *}
        check "package ${line#PKG-CHECK rc=$rc }" "$rc"
    done < <(grep '^PKG-CHECK' "$DIR/install.log")
    [ "$n" -ge 12 ]; check "package: every chroot step ran ($n of 12)" $?
    [ "$n" -ge 12 ] || tail -20 "$DIR/install.log" | sed 's/^/[package] /'
    grep -E '^(installed|scsigate [0-9])' "$DIR/install.log" | sed 's/^/[package] /'
    echo "[package] suite time $(( $(date +%s) - t0 )) s"
}
