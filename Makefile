# The two commands of the README, each installing what it needs first (once).
.PHONY: demo test install

demo: .installed
	snakemake --cores 2

test: .installed
	python3 -m pytest

install: .installed

.installed: pyproject.toml tools/install.sh
	bash tools/install.sh
	touch .installed
