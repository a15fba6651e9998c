# The two commands of the README, each installing what it needs first (once).
.PHONY: demo test install profile

demo: .installed
	snakemake --cores 2

test: .installed
	python3 -m pytest -n 2 --dist loadgroup --no-loadscope-reorder

install: .installed

# `snakemake --profile slurm`: links profiles/slurm into ${XDG_CONFIG_HOME:-~/.config}/snakemake/
# (install.sh does it too); refuses, exit 1, if another profile named slurm is there.
profile:
	bash tools/link_profile.sh

.installed: pyproject.toml tools/install.sh
	bash tools/install.sh
	touch .installed
