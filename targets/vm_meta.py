"""`<target>/model.json`: how a loader calls the Relax VM function every TVM target builds."""
from __future__ import annotations

import json
from pathlib import Path


def write_model_meta(lowered, path: Path) -> None:
    """Input, weight-parameter and output names in the order the VM function takes / returns them;
    `packed`: weights the loader binds pre-packed as [N/NB, K, NB] (name -> NB)."""
    meta = {"function": "main", "inputs": lowered.inputs, "params": lowered.params,
            "outputs": lowered.outputs, "symbols": lowered.symbols, "packed": lowered.packed}
    Path(path).write_text(json.dumps(meta, indent=1))
