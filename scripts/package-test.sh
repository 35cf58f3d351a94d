#!/usr/bin/env bash
# `make package-test`: proves that the Debian package scripts/package.sh builds installs and works
# on a machine that has PostgreSQL 15 and nothing else, without a container and without touching
# the system installation:
#   1. META.json's versions are Cargo.toml's;
#   2. the package's metadata (name, version, section, maintainer, dependencies: postgresql-15 and
#      the package of every library the .so links to) and its exact file list, owners and modes;
#   3. dpkg would install it here (dpkg --dry-run -i: dependencies met, nothing written);
#   4. a copy of the system PostgreSQL 15 tree in a temp root, with every event_projections file
#      removed, gets the package unpacked into it (dpkg -x); PostgreSQL finds its lib and share
#      directories relative to its binary, so a cluster started from that copy loads only what the
#      package brought (checked in the postmaster's memory map), and the demo runs on it.
#
#   scripts/package-test.sh [path/to/package.deb]   (default: the one scripts/package.sh builds)
#
# Private cluster: port 55440, data and socket under /var/tmp/event_projections/pkgtest; stopped
# on exit. The tree and the logs stay there for a look after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PGVER=15
SYS_LIB=/usr/lib/postgresql/$PGVER
SYS_SHARE=/usr/share/postgresql/$PGVER
T=/var/tmp/event_projections/pkgtest
ROOT=$T/root
die() { echo "package-test: FAIL: $*" >&2; exit 1; }
ok() { echo "package-test: ok: $*"; }
as_pg() { runuser -u postgres -- env -u RUST_BACKTRACE "$@"; }

VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["package"]["version"])')
ARCH=$(dpkg --print-architecture)
NAME=postgresql-$PGVER-event-projections
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")
DEB=$(realpath -m "${1:-$TARGET_DIR/package/${NAME}_${VERSION}_${ARCH}.deb}")
[ -f "$DEB" ] || die "no package $DEB (build it with: make package)"
echo "package-test: $DEB"

# A fresh work dir each run (a cluster left over from an interrupted run is stopped first).
stop_cluster() {
  [ -d "$T/cluster/pgdata" ] && as_pg "$SYS_LIB/bin/pg_ctl" -D "$T/cluster/pgdata" -m immediate -w stop >/dev/null 2>&1 || true
}
stop_cluster
rm -rf "$T"
mkdir -p "$T"

# --- 1. META.json: the PGXN metadata must not drift from the crate's version.
python3 - "$VERSION" <<'PY' || die "META.json"
import json, sys
version = sys.argv[1]
meta = json.load(open("META.json"))          # also proves it is valid JSON
bad = [f"{where} is {v!r}" for where, v in
       [("version", meta.get("version")),
        ("provides.event_projections.version", meta.get("provides", {}).get("event_projections", {}).get("version"))]
       if v != version]
if bad:
    sys.exit("META.json: " + "; ".join(bad) + f", Cargo.toml says {version!r}")
PY
ok "META.json is valid JSON, version $VERSION as in Cargo.toml"

# --- 2. Metadata. dpkg -I is what a user would run; it must show a control member and md5sums.
INFO=$(dpkg -I "$DEB")
grep -Eq '^ *[0-9]+ bytes, +[0-9]+ lines +control' <<<"$INFO" || die "dpkg -I shows no control member"
grep -Eq '^ *[0-9]+ bytes, +[0-9]+ lines +md5sums' <<<"$INFO" || die "dpkg -I shows no md5sums member"
field() { dpkg-deb --field "$DEB" "$1"; }
expect_field() { [ "$(field "$1")" = "$2" ] || die "$1 is '$(field "$1")', expected '$2'"; }
expect_field Package "$NAME"
expect_field Version "$VERSION"
expect_field Architecture "$ARCH"
expect_field Section database
[[ $(field Maintainer) =~ ^[^\<]+\ \<[^@\>]+@[^\>]+\>$ ]] || die "Maintainer '$(field Maintainer)' is not 'Name <address>'"
[ -n "$(field Description)" ] || die "no Description"
DEPENDS=$(field Depends)
# The names in Depends, one per line, without versions or alternatives' bars.
DEP_NAMES=$(tr ',|' '\n\n' <<<"$DEPENDS" | sed -E 's/\(.*\)//; s/:any//; s/^ +//; s/ +$//' | grep -v '^$')
grep -qx "postgresql-$PGVER" <<<"$DEP_NAMES" || die "Depends '$DEPENDS' lacks postgresql-$PGVER"
ok "metadata: $NAME $VERSION $ARCH, Section database, Maintainer $(field Maintainer)"

# --- Exact file list, computed from the project and not from the package: the library, the control
# file, the SQL script of this version, and the upgrade scripts kept in sql/ (the files cargo pgrx
# package copies: event_projections--<from>--<to>.sql). Anything
# missing or extra fails; so does an entry not root's, or a file not 0644.
expected=("./usr/lib/postgresql/$PGVER/lib/event_projections.so"
          "./usr/share/postgresql/$PGVER/extension/event_projections.control"
          "./usr/share/postgresql/$PGVER/extension/event_projections--$VERSION.sql")
for f in sql/event_projections--*--*.sql; do
  [ -e "$f" ] && expected+=("./usr/share/postgresql/$PGVER/extension/$(basename "$f")")
done
CONTENTS=$(dpkg-deb --contents "$DEB")
actual=$(awk '$1 ~ /^-/ {print $6}' <<<"$CONTENTS" | sort)
want=$(printf '%s\n' "${expected[@]}" | sort)
if [ "$actual" != "$want" ]; then
  echo "package-test: files in the package:" >&2; sed 's/^/  /' <<<"$actual" >&2
  echo "package-test: files expected:" >&2; sed 's/^/  /' <<<"$want" >&2
  die "the package's files are not the expected ones (missing: $(comm -13 <(echo "$actual") <(echo "$want") | xargs echo), extra: $(comm -23 <(echo "$actual") <(echo "$want") | xargs echo))"
fi
awk '$2 != "root/root" {bad = bad " " $6} END {if (bad) {print bad; exit 1}}' <<<"$CONTENTS" >/dev/null ||
  die "entries not owned by root/root: $(awk '$2 != "root/root" {print $6}' <<<"$CONTENTS" | xargs echo)"
awk '$1 ~ /^-/ && $1 != "-rw-r--r--" {exit 1}' <<<"$CONTENTS" || die "a file is not mode 0644"
ok "contents: exactly ${#expected[@]} files, root-owned, 0644"

# --- 3. dpkg would install it on this machine: dependencies satisfied, nothing written.
dpkg --dry-run -i "$DEB" >"$T/dpkg-dry-run.log" 2>&1 || { cat "$T/dpkg-dry-run.log" >&2; die "dpkg --dry-run -i refused the package"; }
ok "dpkg --dry-run -i accepts it"

# --- 4. A PostgreSQL 15 with nothing of ours: a private copy of the system tree, our files removed.
mkdir -p "$ROOT/usr/lib/postgresql" "$ROOT/usr/share/postgresql"
cp -a "$SYS_LIB" "$ROOT/usr/lib/postgresql/"
cp -a "$SYS_SHARE" "$ROOT/usr/share/postgresql/"
find "$ROOT" -name 'event_projections*' -exec rm -rf {} +
[ -z "$(find "$ROOT" -name 'event_projections*')" ] || die "could not clear event_projections from the copy"

dpkg -x "$DEB" "$ROOT"
dpkg-deb --control "$DEB" "$T/DEBIAN"
(cd "$ROOT" && md5sum --quiet -c "$T/DEBIAN/md5sums") || die "unpacked files do not match the package's md5sums"

PGBIN=$ROOT/usr/lib/postgresql/$PGVER/bin
[ "$("$PGBIN/pg_config" --pkglibdir)" = "$ROOT/usr/lib/postgresql/$PGVER/lib" ] || die "the copy's pkglibdir is not relocated: $("$PGBIN/pg_config" --pkglibdir)"
[ "$("$PGBIN/pg_config" --sharedir)" = "$ROOT/usr/share/postgresql/$PGVER" ] || die "the copy's sharedir is not relocated: $("$PGBIN/pg_config" --sharedir)"
LIB=$ROOT/usr/lib/postgresql/$PGVER/lib/event_projections.so
grep -q "^default_version = '$VERSION'" "$ROOT/usr/share/postgresql/$PGVER/extension/event_projections.control" ||
  die "the packaged control file's default_version is not '$VERSION'"

# Every library the .so needs must resolve here and belong to a package named in Depends.
if ldd "$LIB" | grep -q 'not found'; then ldd "$LIB" >&2; die "the library needs a library this machine lacks"; fi
for path in $(ldd "$LIB" | awk '/=>/ {print $3} !/=>/ && $1 ~ /^\// {print $1}'); do
  owner=""
  for p in "$path" "$(realpath "$path")" "${path#/usr}" "/usr$path"; do
    owner=$(dpkg -S "$p" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$owner" ] && break
  done
  [ -n "$owner" ] || die "no package owns $path"
  grep -qx "$owner" <<<"$DEP_NAMES" || die "the library links $path (package $owner), which Depends '$DEPENDS' lacks"
done
ok "unpacked into a PostgreSQL $PGVER copy at $ROOT; Depends covers every linked library: $DEPENDS"

# The cluster, exactly as the project configures its clusters (scripts/cluster.sh), from the copy.
export EP_PGBIN=$PGBIN EP_PORT=55440 EP_DATA=$T/cluster EP_DB=ep
on_exit() {
  rc=$?
  if [ $rc -ne 0 ] && [ -f "$EP_DATA/server.log" ]; then
    echo "package-test: last lines of $EP_DATA/server.log:" >&2; tail -20 "$EP_DATA/server.log" >&2
  fi
  stop_cluster
  exit $rc
}
trap on_exit EXIT
chmod -R a+rX "$ROOT"

# The demo (scripts/demo.sh, which starts the cluster through scripts/cluster.sh and runs
# examples/demo.sql with ON_ERROR_STOP), pointed at the private cluster.
if ! bash scripts/demo.sh >"$T/demo.log" 2>&1; then
  tail -30 "$T/demo.log" >&2; die "the demo failed on the packaged extension (log: $T/demo.log)"
fi
ok "the demo ran on the packaged extension (log: $T/demo.log)"

q() { bash scripts/cluster.sh psql -X -A -t -q -v ON_ERROR_STOP=1 -c "$1"; }
[ "$(q "SELECT extversion FROM pg_extension WHERE extname = 'event_projections'")" = "$VERSION" ] ||
  die "the installed extension is not version $VERSION"
[ "$(q "SHOW shared_preload_libraries")" = "event_projections" ] || die "event_projections is not preloaded"
[ "$(q "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type LIKE 'event_projections%'")" = t ] ||
  die "no event_projections background worker runs"
# The library in the server's memory is the package's, not one from the system tree.
PM=$(head -1 "$EP_DATA/pgdata/postmaster.pid")
grep -q " $LIB\$" "/proc/$PM/maps" || die "the postmaster did not load $LIB"
! grep -q " $SYS_LIB/lib/event_projections.so\$" "/proc/$PM/maps" || die "the postmaster loaded the system's event_projections.so"
ok "cluster on port $EP_PORT: extension $VERSION from the package, preloaded, workers running"
echo "package-test: passed"
