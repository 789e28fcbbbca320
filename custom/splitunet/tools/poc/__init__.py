"""POC mode: a real FLARE server and one real process per site on this machine, reachable on loopback only.

FLARE's proof-of-concept mode provisions a full consortium (mTLS certificates, one startup kit per party, an
admin kit) and runs every party as its own process, as a real deployment would. :class:`PocConsortium` drives it
for tests and by-hand trials::

    with PocConsortium(tmp / "poc_ws", {"site-1": "flair", "site-2": "t1"}, parties_dir, secret) as poc:
        poc.prepare()   # nvflare poc prepare, then each party's local/ (its own settings entry only)
        poc.start()     # server and sites, waits until every site is connected
        job_id = poc.submit("jobs/split_unet")
        status = poc.wait(job_id, timeout_s=600)
        results = poc.run_dir(job_id, "server") / "results.json"
    # leaving the block shuts everything down, also after an error

Every party gets what a real institution would hold in its ``local/`` folder: its own entry of the settings file
(never the other parties' data paths), the class allow-list entry for the installed ``splitunet`` package (the
job carries no code), and optionally its ``privacy.json``. The server listens on one free port on 127.0.0.1, so
nothing is exposed beyond this machine and a running FLARE on the default ports 8002/8003 is left alone. The
benchmark's rate-limited links instead give each party a network namespace of its own (``host`` and
``party_prefixes``, with :mod:`splitunet.tools.netns_links`): still nothing outside this machine.

Modules: ``errors`` (PocError), ``timeouts`` (PocTimeouts), ``kits`` (provisioning and editing the startup kits
and ``local/`` folders), ``processes`` (starting, tracking and killing party and job processes), ``admin`` (the
bounded admin-API session) and ``consortium`` (PocConsortium, which orders these steps, and PocStopReport).
"""

from splitunet.tools.poc.consortium import PocConsortium, PocStopReport
from splitunet.tools.poc.errors import PocError
from splitunet.tools.poc.kits import (
    ADMIN_USER,
    LOOPBACK_HOST,
    PROJECT_NAME,
    find_free_port,
    party_settings_entry,
    pin_kits_to_loopback,
    poc_project_config,
    write_party_local,
)
from splitunet.tools.poc.timeouts import PocTimeouts

__all__ = [
    "ADMIN_USER",
    "LOOPBACK_HOST",
    "PROJECT_NAME",
    "PocError",
    "PocTimeouts",
    "PocStopReport",
    "PocConsortium",
    "find_free_port",
    "poc_project_config",
    "pin_kits_to_loopback",
    "party_settings_entry",
    "write_party_local",
]
