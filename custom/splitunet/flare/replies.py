"""Error replies shared by both FLARE adapters: the site's message travels in a header, never a traceback."""

from __future__ import annotations

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply

from splitunet.wire.protocol import SITE_ERROR_HEADER

__all__ = ["error_reply", "reply_error_message"]


def error_reply(message: str) -> Shareable:
    """A reply that tells the server why this party could not do the task."""
    return make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={SITE_ERROR_HEADER: message})


def reply_error_message(reply: Shareable) -> str | None:
    """The error in a reply, or ``None`` if it succeeded."""
    return_code = reply.get_return_code(ReturnCode.OK)
    if return_code == ReturnCode.OK:
        return None
    return reply.get_header(SITE_ERROR_HEADER) or f"return code {return_code}"
