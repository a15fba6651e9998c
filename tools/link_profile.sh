#!/usr/bin/env bash
# Make `snakemake --profile slurm` find this checkout's SLURM profile from any directory.
# Snakemake looks a profile NAME up in the current directory, in its per-user folder
# ${XDG_CONFIG_HOME:-~/.config}/snakemake and in /etc/xdg/snakemake -- not in ./profiles/.
# This links profiles/slurm into the per-user folder. Run again, it does nothing; it never
# replaces a profile of that name that is not a link to this checkout's profiles/slurm.
# Usage: bash tools/link_profile.sh [NAME]      (NAME defaults to slurm; `make profile` runs it)
# Exit 0: linked or already linked; 1: refused (something else is there; the message says what).
set -euo pipefail
name=${1:-slurm}
case "$name" in
    "" | */* | . | ..) echo "link_profile.sh: bad profile name '$name'" >&2; exit 2 ;;
esac
source_dir=$(cd "$(dirname "$0")/../profiles/slurm" && pwd -P)
# The same folder as Snakemake's (platformdirs: an empty XDG_CONFIG_HOME means ~/.config).
config_home=${XDG_CONFIG_HOME:-${HOME:?HOME is not set}/.config}
dest="$config_home/snakemake/$name"

if [ -L "$dest" ] || [ -e "$dest" ]; then
    if [ -L "$dest" ] && [ "$(readlink -f "$dest")" = "$source_dir" ]; then
        echo "link_profile.sh: $dest -> $source_dir already; snakemake --profile $name uses it"
        exit 0
    fi
    if [ -L "$dest" ]; then
        what="a link to $(readlink "$dest")"
        [ -e "$dest" ] || what="$what, which does not exist"
    elif [ -d "$dest" ]; then
        what="a folder (a profile of its own, or a copy)"
    else
        what="a file"
    fi
    again="bash tools/link_profile.sh $name"
    [ "$name" = slurm ] && again="make profile"
    cat >&2 <<MSG
link_profile.sh: NOT linking: $dest already exists and is $what,
not a link to this checkout's $source_dir. It is left as it is. Either
  - move it away (mv "$dest" "$dest.old") and run \`$again\` again,
  - or link this checkout under another name: bash tools/link_profile.sh mofo-slurm
    (then: snakemake --profile mofo-slurm ...),
  - or give the profile as a path: snakemake --profile $source_dir ...
MSG
    exit 1
fi

mkdir -p "$(dirname "$dest")"
ln -s "$source_dir" "$dest"
echo "link_profile.sh: linked $dest -> $source_dir; snakemake --profile $name now uses it"
