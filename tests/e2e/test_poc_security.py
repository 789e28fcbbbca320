"""End to end in POC mode: who may join the consortium, and which privacy scope a site accepts a job under.

(a) Only a client with a certificate of this consortium's provisioning joins. An outsider provisions a project of
    its own (same project name, its own root CA) and points a FLARE client at the POC server's port: in FLARE 2.9 it
    refuses the server's certificate (``CERTIFICATE_VERIFY_FAILED`` in its log, again on every retry), and the server
    never lists it as connected. The server's half of the mutual TLS is probed with a plain TLS client, because a
    FLARE 2.9 client given the genuine ``rootCA.pem`` with a foreign certificate never reaches the network: its cell
    refuses a certificate that does not chain to its root CA (``InvalidCertChain``, which ``client_train`` swallows,
    so the process then waits without a log line). The foreign CA's certificate for the name ``site-1`` and no
    certificate at all are refused, with TLS 1.2 and 1.3, while site-1's own certificate is served.
(b) A job whose ``meta.json`` names a privacy scope that a site's ``local/privacy.json`` does not define is not
    deployed to that site: FLARE's ``AppDeployer`` answers ``privacy scope '<name>' is not allowed``, the site keeps
    no run folder, and as the job needs both sites (``min_clients: 2`` here) the server ends the job
    ``FINISHED:FAILED_TO_RUN``. site-2, whose policy defines the scope, accepts the same job: each site checks
    against its own policy.
(c) A job naming no scope runs under each site's default scope, with that scope's filters: covered by
    ``tests/e2e/test_poc_privacy_scope.py``, not repeated here.

One consortium of two sites serves (a) and (b); the job never trains, so the module takes well under a minute on
an idle 2-core machine.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from tiny_job import tiny_server_args

from splitunet.tools.deployment import copy_job_with_overrides, default_site_modalities, find_job
from splitunet.tools.poc import (
    LOOPBACK_HOST,
    PROJECT_NAME,
    PocConsortium,
    PocTimeouts,
    pin_kits_to_loopback,
    poc_project_config,
)
from splitunet.tools.poc.kits import SERVER_NAME, provision_kits
from splitunet.tools.poc.processes import FLARE_LOG, PartyProcesses, launch_party, party_environment

pytestmark = pytest.mark.e2e

SITES = default_site_modalities(2)  # site-1: flair, site-2: t1
TINY = tiny_server_args(num_iterations=2, val_every=2, num_val_cases=1, batch_size=1)
TIMEOUTS = PocTimeouts(start_s=90, stop_s=45, admin_call_s=30)

# The outsider's own provisioning: a client named like no site of the consortium (so the server's listing can be
# searched for it), and one named like a member, whose certificate only the foreign CA signed.
ROGUE, IMPERSONATED = "site-3", "site-1"
# The rogue is watched until its log shows this many refused connections and at least the shorter window has
# passed (a genuine site is listed within seconds of starting), or until the longer window ends.
ROGUE_REFUSALS, ROGUE_MIN_WATCH_S, ROGUE_MAX_WATCH_S = 2, 10.0, 90.0
# In a FLARE client's log: the certificate check that fails, and the line of a client the server admitted.
CERT_REFUSED = "CERTIFICATE_VERIFY_FAILED"
REGISTERED = "Successfully registered client"
PROBE_TIMEOUT_S = 15.0

# site-1 defines only "public"; site-2 also "research", the scope the job names.
NAMED_SCOPE = "research"
SITE_POLICIES = {
    "site-1": {"scopes": [{"name": "public", "task_result_filters": []}], "default_scope": "public"},
    "site-2": {
        "scopes": [{"name": "public", "task_result_filters": []}, {"name": NAMED_SCOPE, "task_result_filters": []}],
        "default_scope": "public",
    },
}
REJECTING_SITE, ACCEPTING_SITE = "site-1", "site-2"
JOB_TIMEOUT_S = 60  # the rejection is decided when the job is deployed, seconds after submitting

TLS_VERSIONS = {"TLS 1.2": ssl.TLSVersion.TLSv1_2, "TLS 1.3": ssl.TLSVersion.TLSv1_3}
# Client credentials of each probe -> the outcome the server must give it.
PROBES = {"foreign certificate": "refused", "no certificate": "refused", "own certificate": "served"}


def _foreign_kits(workspace: Path, port: int) -> Path:
    """An unrelated provisioning (its own root CA) whose client kits point at the consortium's server."""
    prod_dir = workspace / "poc" / PROJECT_NAME / "prod_00"
    project = poc_project_config([ROGUE, IMPERSONATED], port)
    provision_kits(project, workspace, workspace / "poc", prod_dir, TIMEOUTS.prepare_s)
    pin_kits_to_loopback(prod_dir, [ROGUE, IMPERSONATED], port)
    return prod_dir


def _job_naming_scope(root: Path, scope: str) -> Path:
    job = copy_job_with_overrides(find_job(), root / "job" / "split_unet", TINY)
    meta = json.loads((job / "meta.json").read_text())
    assert "scope" not in meta and meta.get("min_clients") == 4, meta  # every modality: this consortium has two
    meta["min_clients"] = len(SITES)  # what (b) relies on: the job needs every site of this consortium
    meta["scope"] = scope
    (job / "meta.json").write_text(json.dumps(meta, indent=2))
    return job


def _tls_probe(port: int, root_ca: Path, credentials: tuple[Path, Path] | None, version: ssl.TLSVersion) -> str:
    """Connect to the server with a plain TLS client and ask for ``/``.

    Returns:
        ``"served"`` (an HTTP reply came), ``"refused"`` (the server broke the handshake or closed the connection
        without a reply), ``"server not trusted"`` (the probe itself refused the server's certificate) or
        ``"no reply"`` (nothing within ``PROBE_TIMEOUT_S``), each with the detail after a colon.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
    context.check_hostname = False  # FLARE's certificates name the party, not the host
    context.minimum_version = context.maximum_version = version
    if credentials is not None:
        context.load_cert_chain(str(credentials[0]), str(credentials[1]))
    try:
        with socket.create_connection((LOOPBACK_HOST, port), timeout=PROBE_TIMEOUT_S) as raw:
            with context.wrap_socket(raw) as tls:
                # With TLS 1.3 the server checks the client's certificate after the client's side of the handshake
                # has ended, so only the answer to a request tells whether it was accepted.
                tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                reply = tls.recv(64)
    except ssl.SSLCertVerificationError as error:
        return f"server not trusted: {error}"
    except TimeoutError as error:
        return f"no reply: {error}"
    except (ssl.SSLError, ConnectionError) as error:
        return f"refused: {type(error).__name__}: {error}"
    if reply.startswith(b"HTTP/"):
        return f"served: {reply.splitlines()[0].decode(errors='replace')}"
    return f"refused: connection closed after the handshake, reply {reply!r}"


def _refusals(log: Path, port: int) -> list[str]:
    """Lines of a FLARE client's log where its connection to the server failed the certificate check."""
    if not log.is_file():
        return []
    address = f"{LOOPBACK_HOST}:{port}"
    return [line for line in log.read_text(errors="replace").splitlines() if CERT_REFUSED in line and address in line]


def _watch_rogue(poc: PocConsortium, rogues: PartyProcesses, log: Path) -> dict:
    """List the connected clients every poll while the rogue tries to connect (bounded by ``ROGUE_MAX_WATCH_S``)."""
    started = time.monotonic()
    listings: list[list[str]] = []
    while True:
        exited = rogues.poll()
        listings.append(sorted(poc.connected_sites()))
        refusals = _refusals(log, poc.port)
        watched_s = time.monotonic() - started
        if exited is not None or ROGUE in listings[-1] or watched_s > ROGUE_MAX_WATCH_S:
            break
        if len(refusals) >= ROGUE_REFUSALS and watched_s >= ROGUE_MIN_WATCH_S:
            break
        time.sleep(TIMEOUTS.poll_s)
    return {"listings": listings, "refusals": refusals, "exited": exited, "watched_s": watched_s}


@pytest.fixture(scope="module")
def security_run(tmp_path_factory, tiny_parties):
    root = tmp_path_factory.mktemp("poc_security")
    job = _job_naming_scope(root, NAMED_SCOPE)
    poc = PocConsortium(
        root / "ws", SITES, tiny_parties, "poc-security-secret", privacy_policies=SITE_POLICIES, timeouts=TIMEOUTS
    )
    run: dict = {"poc": poc}
    with poc:  # stops everything also when an assertion or timeout below fails
        poc.prepare()
        foreign = _foreign_kits(root / "foreign", poc.port)
        poc.start()
        own, forged = poc.party_dir(IMPERSONATED) / "startup", foreign / IMPERSONATED / "startup"
        credentials = {
            "foreign certificate": (forged / "client.crt", forged / "client.key"),
            "no certificate": None,
            "own certificate": (own / "client.crt", own / "client.key"),
        }
        run["probes"] = {
            (probe, version): _tls_probe(poc.port, own / "rootCA.pem", credentials[probe], tls_version)
            for probe in PROBES
            for version, tls_version in TLS_VERSIONS.items()
        }
        rogues = PartyProcesses(foreign)
        try:
            rogues.add(ROGUE, launch_party(foreign / ROGUE, party_environment(1, {})))
            run["rogue"] = _watch_rogue(poc, rogues, foreign / ROGUE / FLARE_LOG)
        finally:
            run["rogue_killed"], run["rogue_survivors"] = rogues.kill_all()
        job_id = poc.submit(job)
        run["job_id"], run["status"] = job_id, poc.wait(job_id, timeout_s=JOB_TIMEOUT_S)
        run["job_meta"] = poc.job_meta(job_id)
        run["report"] = poc.stop()
    run["processes_after"] = poc.processes() + rogues.alive()
    run["logs"] = {party: (poc.party_dir(party) / FLARE_LOG).read_text(errors="replace") for party in poc.parties}
    run["rogue_log"] = (foreign / ROGUE / FLARE_LOG).read_text(errors="replace")
    return run


# -- (a) a client without the consortium's certificates --------------------------------------------------------------


def test_a_foreign_client_is_never_listed_as_connected(security_run):
    rogue = security_run["rogue"]
    assert rogue["exited"] is None, "the rogue client exited instead of retrying; see its log"
    assert not any(ROGUE in listing for listing in rogue["listings"]), rogue["listings"]
    # The listing does show admitted clients: every site of the consortium, and nobody else.
    assert all(set(listing) <= set(SITES) for listing in rogue["listings"]), rogue["listings"]
    assert rogue["listings"][-1] == sorted(SITES)
    assert rogue["watched_s"] >= ROGUE_MIN_WATCH_S and len(rogue["listings"]) >= 2


def test_the_foreign_client_logs_the_certificate_failure_on_every_try(security_run):
    port, rogue_log = security_run["poc"].port, security_run["rogue_log"]
    refusals = security_run["rogue"]["refusals"]
    assert len(refusals) >= ROGUE_REFUSALS, f"no {CERT_REFUSED} for {LOOPBACK_HOST}:{port} in:\n{rogue_log[-3000:]}"
    assert REGISTERED not in rogue_log
    # The same markers, read the other way round: each genuine site registered, and the server logged a TLS
    # connection of each genuine site but none of the rogue.
    logs = security_run["logs"]
    for site in SITES:
        assert f"{REGISTERED}:{site}" in logs[site]
        assert f"SSL {site}] is created" in logs[SERVER_NAME]
    assert f"SSL {ROGUE}]" not in logs[SERVER_NAME]


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("probe", PROBES)
def test_the_server_serves_only_a_client_certificate_of_its_own_ca(security_run, probe, version):
    outcome = security_run["probes"][(probe, version)]
    assert outcome.split(":", 1)[0] == PROBES[probe], outcome


def test_the_rogue_is_killed_and_no_process_survives(security_run):
    assert [entry.split(" pid=")[0] for entry in security_run["rogue_killed"]] == [ROGUE]
    assert security_run["rogue_survivors"] == []
    report = security_run["report"]
    assert report.all_stopped and report.graceful, report
    assert security_run["processes_after"] == []


# -- (b) a job naming a privacy scope that a site does not define ----------------------------------------------------


def test_a_job_naming_a_scope_a_site_lacks_fails_to_run(security_run):
    assert security_run["status"] == "FINISHED:FAILED_TO_RUN"
    assert security_run["job_meta"]["scope"] == NAMED_SCOPE


def test_only_the_site_without_the_scope_rejects_the_job(security_run):
    poc, job_id = security_run["poc"], security_run["job_id"]
    detail = security_run["job_meta"]["job_deploy_detail"]
    refusal = f"privacy scope '{NAMED_SCOPE}' is not allowed"
    assert [line for line in detail if line.startswith(f"{REJECTING_SITE}:")] == [
        f"{REJECTING_SITE}: NVFLARE_ERROR: {refusal}"
    ], detail
    assert f"{ACCEPTING_SITE}: OK" in detail and f"{SERVER_NAME}: OK" in detail, detail
    # Refused before anything was unpacked: no run folder, and the job never shows up in the site's log.
    assert not (poc.party_dir(REJECTING_SITE) / job_id).exists()
    assert job_id not in security_run["logs"][REJECTING_SITE]
    accepted = json.loads((poc.party_dir(ACCEPTING_SITE) / job_id / "meta.json").read_text())
    assert accepted["scope"] == NAMED_SCOPE


def test_the_server_logs_why_the_job_did_not_run(security_run):
    failed = f"Failed to run the Job ({security_run['job_id']})"
    lines = [line for line in security_run["logs"][SERVER_NAME].splitlines() if failed in line]
    assert len(lines) == 1, lines
    assert f"{REJECTING_SITE}: NVFLARE_ERROR: privacy scope '{NAMED_SCOPE}' is not allowed" in lines[0]
