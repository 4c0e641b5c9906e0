"""`<target>/model.json`: how a loader calls the Relax VM function every TVM target builds."""
from __future__ import annotations

import json
from pathlib import Path


def model_meta(lowered) -> dict:
    """Input, weight-parameter and output names in the order the VM function takes / returns them;
    `packed`: weights the loader binds pre-packed as [N/NB, K, NB] (name -> NB); `packed_rows`: quantized
    operands stored [N, X], bound as [N/NB, X, NB]."""
    return {"function": "main", "inputs": lowered.inputs, "params": lowered.params,
            "outputs": lowered.outputs, "symbols": lowered.symbols, "packed": lowered.packed,
            "packed_rows": lowered.packed_rows}


def write_model_meta(meta: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(meta, indent=1))
