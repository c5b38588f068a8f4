"""Deployment files shipped as package data (``ptylive.systemd``): the systemd unit, the example
``/etc/ptylive/ptylive.toml``, the Prometheus scrape job and the Grafana dashboard with its provisioning.

``ptylive service install --prefix DIR`` (:mod:`ptylive.daemon.cli.service_install`) writes them out.
"""
