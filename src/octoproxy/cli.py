"""The `octo-proxy` command."""

from __future__ import annotations

import sys

import click

from octoproxy import __version__
from octoproxy.config import ConfigError, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """octo-proxy: a service-mesh sidecar data plane for OCTO RPC traffic."""


@main.command()
def version() -> None:
    """Print the version and whether the compiled core is loaded."""
    from octoproxy._core import frame  # noqa: F401  (fails loudly if the core is missing)

    click.echo(f"octo-proxy {__version__} (core: compiled, python {sys.version.split()[0]})")


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def validate(config_path: str) -> None:
    """Check a config file; print every error with its path in the file."""
    try:
        load_config(config_path)
    except ConfigError as e:
        click.echo(f"{e.source}: {len(e.problems)} error(s)", err=True)
        for p in e.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    click.echo(f"{config_path}: ok")


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--hot-restart-from", "hot_restart_from", default=None,
              help="Take over the listening sockets of the proxy listening on this hot-restart UDS.")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: str, hot_restart_from: str | None, log_level: str | None) -> None:
    """Run the proxy with a config file."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        click.echo(f"{e.source}: {len(e.problems)} error(s)", err=True)
        for p in e.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    from octoproxy.server import run_proxy

    sys.exit(run_proxy(cfg, config_path=config_path, hot_restart_from=hot_restart_from,
                       log_level=log_level))


if __name__ == "__main__":  # pragma: no cover
    main()
