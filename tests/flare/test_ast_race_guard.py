"""The lock around ``ast.literal_eval`` that FLARE processes install (a CPython 3.11 race failed the SplitFed job)."""

import ast
import io
import threading

import numpy as np

import splitunet.flare  # noqa: F401  (installs the guard, as every FLARE process of ours does)
from splitunet.flare.ast_race_guard import serialise_literal_eval


def test_loading_the_flare_layer_serialises_literal_eval_once():
    guarded = ast.literal_eval
    assert getattr(guarded, "_splitunet_serialised", False)
    serialise_literal_eval()
    assert ast.literal_eval is guarded  # not wrapped twice


def test_numpy_headers_still_parse_from_many_threads_at_once():
    buffer = io.BytesIO()
    np.save(buffer, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    payload = buffer.getvalue()
    results, errors = [], []

    def load():
        try:
            for _ in range(200):
                results.append(np.load(io.BytesIO(payload), allow_pickle=False).shape)
        except Exception as error:  # noqa: BLE001  (any failure fails the test below)
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and results == [(2, 3, 4)] * 1600
    assert ast.literal_eval("{'a': (1, 2)}") == {"a": (1, 2)}
