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
@click.option("--paths/--no-paths", default=True, show_default=True,
              help="Also check, on this host, the directories of the sockets and files "
                   "the proxy writes (--no-paths: a config meant for another host).")
def validate(config_path: str, paths: bool) -> None:
    """Check a config file; print every error with its path in the file."""
    try:
        cfg = load_config(config_path)
        from octoproxy import auth

        auth.load(cfg)  # the token file: its mode, its form, the tokens sign_for needs
        if paths:
            from octoproxy.server import check_paths

            problems = check_paths(cfg)
            if problems:
                raise ConfigError(config_path, problems)
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
    from octoproxy.process import hold_signals

    hold_signals()  # a SIGTERM while starting waits for its handler (server.run_proxy)
    try:
        cfg = load_config(config_path)
        from octoproxy import auth

        auth.load(cfg)  # refuse to start on a bad token file (read again by the proxy)
    except ConfigError as e:
        click.echo(f"{e.source}: {len(e.problems)} error(s)", err=True)
        for p in e.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    from octoproxy.server import run_proxy

    sys.exit(run_proxy(cfg, config_path=config_path, hot_restart_from=hot_restart_from,
                       log_level=log_level))


@main.command("control-plane", context_settings={"ignore_unknown_options": True})
@click.option("--endpoints", required=True, type=click.Path(dir_okay=False),
              help="YAML (or .json) file of services and endpoints; watched for changes.")
@click.option("--tokens", default=None, type=click.Path(dir_okay=False),
              help="Token file served as SDS secrets (mode 0600/0400); watched for changes.")
@click.option("--listen", default="127.0.0.1:18000", show_default=True, help="HOST:PORT")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def control_plane(endpoints: str, tokens: str | None, listen: str, log_level: str) -> None:
    """Run the bundled xDS control plane (ADS, SotW and delta) from a file."""
    from octoproxy.controlplane.server import main as cp_main

    sys.exit(cp_main(["--endpoints", endpoints, "--listen", listen, "--log-level", log_level]
                     + (["--tokens", tokens] if tokens else [])))


@main.command()
@click.option("--seconds", default=12.0, show_default=True, help="How long traffic runs.")
@click.option("--short", is_flag=True, help="A quick run (CI).")
@click.option("--chart", type=click.Path(dir_okay=False), default=None,
              help="Also write latency over time, restarts marked, as an SVG or PNG chart.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def demo(seconds: float, short: bool, chart: str | None, no_progress: bool) -> None:
    """Run the demo: control plane, two proxies, providers in several cells,
    swimlanes and IDCs, traffic with hot restarts, and a report."""
    from octoproxy.demo import run_demo

    sys.exit(run_demo(seconds=3.0 if short else seconds, chart=chart, progress=not no_progress))


if __name__ == "__main__":  # pragma: no cover
    main()
