"""`<target>/model.json`: how a loader calls the Relax VM function every TVM target builds."""
from __future__ import annotations

import json
from pathlib import Path


def model_meta(lowered, functions=None) -> dict:
    """Input, weight-parameter and output names in the order the VM function takes / returns them;
    `packed`: weights the loader binds pre-packed as [.., N/NB, K, NB] (name -> NB); `packed_rows`: quantized
    operands stored [N, X], bound as [N/NB, X, NB].

    `functions`: further Relax functions of the same library (name -> their Lowered; the derived
    generation programs `prefill` / `decode`), recorded the same way under "functions"; they share
    the weights (bound once, in one layout) with `main`."""
    meta = {"function": "main", "inputs": lowered.inputs, "params": lowered.params,
            "outputs": lowered.outputs, "symbols": lowered.symbols, "packed": dict(lowered.packed),
            "packed_rows": dict(lowered.packed_rows)}
    if functions:
        meta["functions"] = {name: {"inputs": f.inputs, "params": f.params, "outputs": f.outputs,
                                    "symbols": f.symbols} for name, f in functions.items()}
        for f in functions.values():
            meta["packed"].update(f.packed)
            meta["packed_rows"].update(f.packed_rows)
    return meta


def write_model_meta(meta: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(meta, indent=1))
