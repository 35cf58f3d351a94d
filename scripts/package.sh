#!/usr/bin/env bash
# `make package`: a Debian package of the extension for PostgreSQL 15,
#   $CARGO_TARGET_DIR/package/postgresql-15-event-projections_<version>_<arch>.deb
# (CARGO_TARGET_DIR defaults to ./target). Its files are exactly what `cargo pgrx package` lays
# out (the .so under /usr/lib/postgresql/15/lib, the control file and the SQL scripts under
# /usr/share/postgresql/15/extension); scripts/package-test.sh proves it installs and works.
#
# Settings (environment): PG_CONFIG (default /usr/lib/postgresql/15/bin/pg_config),
# DEB_MAINTAINER (the Maintainer field).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
MAINTAINER=${DEB_MAINTAINER:-event_projections maintainers <maintainers@users.noreply.r-seed-c74bbd6c.example>}
die() { echo "package: $*" >&2; exit 1; }

# The target dir the build uses, made absolute: cargo resolves a relative CARGO_TARGET_DIR against
# the current directory, and we are at the top of the checkout.
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")
OUT=$TARGET_DIR/package

# The version comes from Cargo.toml (the one place it is written: the control file's
# default_version is @CARGO_VERSION@, filled in by pgrx), the PostgreSQL major from pg_config, so
# that the package name, its Depends and the directories pgrx fills all agree.
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["package"]["version"])')
DESCRIPTION=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["package"]["description"])')
PGVER=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
[[ $PGVER =~ ^[0-9]+$ ]] || die "cannot read the PostgreSQL major version from $PG_CONFIG"
ARCH=$(dpkg --print-architecture)
NAME=postgresql-$PGVER-event-projections   # Debian's naming for extensions: postgresql-<major>-<ext>
DEB=$OUT/${NAME}_${VERSION}_${ARCH}.deb

# dpkg-shlibdeps (dpkg-dev) computes the library dependencies; setup.sh does not install it, and
# every make target installs what it needs.
if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
  echo "package: installing dpkg-dev"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
fi

# A fresh out dir for pgrx: it adds files but never removes any, so a stale SQL script from an older
# version would otherwise end up in the package. Not target/release/event_projections-pg15, which
# the benchmark reads (bench/env.sh), so that a package build never changes what a bench measures.
STAGE=$OUT/stage
ROOT=$OUT/root
rm -rf "$STAGE" "$ROOT" "$DEB"
mkdir -p "$OUT"
# EP_PACKAGE_DEBUG=1 (make test): the same package from a debug build, which checks the packaging
# without a second release build; `make package` builds the release one.
BUILD=release; [ -n "${EP_PACKAGE_DEBUG:-}" ] && BUILD=debug
echo "package: cargo pgrx package ($BUILD) into $STAGE"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$STAGE" ${EP_PACKAGE_DEBUG:+--debug}

SO=$STAGE/usr/lib/postgresql/$PGVER/lib/event_projections.so
EXT=$STAGE/usr/share/postgresql/$PGVER/extension
[ -f "$SO" ] || die "cargo pgrx package left no $SO"
[ -f "$EXT/event_projections.control" ] || die "cargo pgrx package left no event_projections.control"
[ -f "$EXT/event_projections--$VERSION.sql" ] || die "cargo pgrx package left no event_projections--$VERSION.sql"

# The package tree: pgrx's layout as it is, plus DEBIAN/. Regular files 0644 (Debian policy for
# shared libraries too), directories 0755; dpkg-deb --root-owner-group makes them root's.
cp -a "$STAGE" "$ROOT"
find "$ROOT" -type d -exec chmod 0755 {} +
find "$ROOT" -type f -exec chmod 0644 {} +
mkdir -p "$ROOT/DEBIAN"

# Library dependencies as Debian computes them (e.g. libc6 (>= 2.34), libgcc-s1 (>= 4.2)): the
# versions come from the symbols the .so actually uses. dpkg-shlibdeps wants a debian/control to
# read, so it runs in a scratch dir with a minimal one.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$NAME" "$NAME" > "$SCRATCH/debian/control"
SHLIBS=$(cd "$SCRATCH" && dpkg-shlibdeps -O -e"$SO" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no library dependencies for $SO"

# The extension only loads into the server it was built against: depend on that major's server
# package (which also owns the directories the files go to).
{
  echo "Package: $NAME"
  echo "Version: $VERSION"
  echo "Architecture: $ARCH"
  echo "Maintainer: $MAINTAINER"
  echo "Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)"
  echo "Depends: postgresql-$PGVER, $SHLIBS"
  echo "Section: database"
  echo "Priority: optional"
  echo "Description: PostgreSQL $PGVER extension: event store with trustworthy projections"
  # The long description: Cargo's description, folded to Debian's width, each line indented.
  echo "$DESCRIPTION It must be preloaded (shared_preload_libraries = 'event_projections')." |
    fold -s -w 78 | sed 's/ *$//; s/^/ /'
} > "$ROOT/DEBIAN/control"
(cd "$ROOT" && find usr -type f -print0 | sort -z | xargs -0 md5sum) > "$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/md5sums"

dpkg-deb --root-owner-group --build "$ROOT" "$DEB" >/dev/null
echo "package: $DEB"
dpkg-deb --info "$DEB" | sed -n '/Package:/,$p'
