#!/usr/bin/env bash
# Vendor the stylesheets, scripts and fonts that GX's Data Docs pages load from CDNs, so
# the pages render with no network (gx/plugins/ptune_data_docs.py points the pages at
# these copies). The files come from `npm pack`; every tarball and file must match
# SHA256SUMS before anything is written here.
#
#   gx/plugins/custom_data_docs/assets/fetch.sh           re-fetch, verify, write the files
#   gx/plugins/custom_data_docs/assets/fetch.sh --update  after changing a version: record new hashes
set -euo pipefail

# The versions great_expectations 1.24.1 names in its page templates
# (render/view/templates/page.j2, index_page.j2, js_script_imports.j2). Its filter-control
# stylesheet is 1.19.0's; 1.19.1's (the version of its script) is used for both.
# vega, vega-lite and vega-embed are not here: plots/offline.html already holds them.
declare -A FILES=(
  [bootstrap@4.3.1]="dist/css/bootstrap.min.css dist/js/bootstrap.min.js LICENSE"
  [jquery@3.7.1]="dist/jquery.min.js LICENSE.txt"
  [popper.js@1.12.9]="dist/umd/popper.min.js"
  [bootstrap-table@1.19.1]="dist/bootstrap-table.min.css dist/bootstrap-table.min.js dist/extensions/filter-control/bootstrap-table-filter-control.min.css dist/extensions/filter-control/bootstrap-table-filter-control.min.js LICENSE"
  [bootstrap-datepicker@1.9.0]="dist/css/bootstrap-datepicker.min.css dist/js/bootstrap-datepicker.min.js LICENSE"
  [@forevolve/bootstrap-dark@1.1.0]="dist/css/bootstrap-prefers-dark.min.css LICENSE"
  # Chromium, Firefox and Safari take the .woff2 that all.min.css lists first; the .ttf fallbacks are left out.
  [@fortawesome/fontawesome-free@6.6.0]="css/all.min.css webfonts/fa-brands-400.woff2 webfonts/fa-regular-400.woff2 webfonts/fa-solid-900.woff2 webfonts/fa-v4compatibility.woff2 LICENSE.txt"
)

assets=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
  "") update=false ;;
  --update) update=true ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir out
npm pack --silent "${!FILES[@]}" >/dev/null
for spec in "${!FILES[@]}"; do
  name=${spec%@*}
  short=${name##*/}
  tarball=$(echo "${name#@}" | tr / -)-${spec##*@}.tgz
  mkdir "x.$short"
  tar -xzf "$tarball" -C "x.$short"
  for f in ${FILES[$spec]}; do
    case "$f" in
      LICENSE*) dest="out/LICENSE.$short" ;;
      css/all.min.css) dest="out/fontawesome/css/all.min.css" ;;    # it loads ../webfonts/
      webfonts/*) dest="out/fontawesome/$f" ;;
      *) dest="out/$(basename "$f")" ;;
    esac
    mkdir -p "$(dirname "$dest")"
    cp "x.$short/package/$f" "$dest"
  done
done

if $update; then
  (sha256sum ./*.tgz; cd out && find . -type f | sort | xargs sha256sum | sed 's| \./| |') | sed 's| \./| |' \
    >"$assets/SHA256SUMS"
  echo "recorded new hashes in $assets/SHA256SUMS: update PROVENANCE.md" >&2
fi
grep '\.tgz$' "$assets/SHA256SUMS" | sha256sum --quiet -c
(cd out && grep -v '\.tgz$' "$assets/SHA256SUMS" | sha256sum --quiet -c)
cp -r out/. "$assets/"
echo "wrote $(find out -type f | wc -l) files to $assets" >&2
