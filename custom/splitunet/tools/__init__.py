"""Operator tools: the ``splitunet`` command (:mod:`~splitunet.tools.cli`), the simulator demo, prediction of new
cases, site and kit configuration for deployments, and the POC harness. Nothing on a training party imports them.
"""
