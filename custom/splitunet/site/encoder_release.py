"""Whether a site lets its encoder's weights leave it: off unless its own policy says so.

With several sites per modality (SplitFed) the server asks each site for its encoder every few iterations and
averages the copies. The server then holds the encoder that made the activations it receives, which is the white-box
attacker's position (measured in docs/splitfed_leakage.md): the private encoder seed stops protecting the site from
the first average on. So a site uploads its encoder only if its administrator opted in, in the site's own
``local/privacy.json`` (FLARE ignores the key), next to its scopes, minimum defense and epsilon cap::

    "splitunet_share_encoder": true

No job can switch it on: the job's arguments are the consortium's, the policy file is the site's. A site without the
key refuses the upload, naming the key and what the upload would reveal; nothing else in the run changes. Plain
Python, no FLARE.
"""

from __future__ import annotations

from pathlib import Path

from splitunet.errors import SplitUNetConfigError
from splitunet.site.policy_file import ABSENT, policy_entry

__all__ = ["SHARE_ENCODER_KEY", "EncoderReleaseRefused", "read_share_encoder", "check_share_encoder"]

SHARE_ENCODER_KEY = "splitunet_share_encoder"


class EncoderReleaseRefused(SplitUNetConfigError):
    """The server asked for the site's encoder and the site's policy does not allow it to leave."""


def read_share_encoder(privacy_file: str | Path) -> bool:
    """Whether ``privacy_file`` (a site's ``local/privacy.json``) lets the encoder leave; ``False`` without the file or
    the key.

    Raises:
        SplitUNetConfigError: the file cannot be read, or the key holds anything but ``true`` or ``false`` (the
            message names the file and the key).
    """
    value = policy_entry(privacy_file, SHARE_ENCODER_KEY)
    if value is ABSENT:
        return False
    if not isinstance(value, bool):
        raise SplitUNetConfigError(
            f"local/{Path(privacy_file).name} {SHARE_ENCODER_KEY} must be true or false, got {value!r}"
        )
    return value


def check_share_encoder(allowed: bool, party: str) -> None:
    """Refuse the upload of ``party``'s encoder unless its policy allows it.

    Raises:
        EncoderReleaseRefused: naming the site and the key to set (no path, no case: the message reaches the server).
    """
    if not allowed:
        raise EncoderReleaseRefused(
            f"site {party} refuses to send its encoder for averaging: its local/privacy.json does not set "
            f'"{SHARE_ENCODER_KEY}": true. The server would hold the encoder that makes this site\'s activations and '
            "could invert them as a white-box attacker (docs/splitfed_leakage.md)"
        )
