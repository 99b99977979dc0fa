"""BitFit (Ben Zaken et al. 2022): every bias trains, plus the head; saved as ``bitfit.safetensors``.

"Every bias" includes the embedding and block LayerNorm biases (and the pooler's bias; its weight
trains only with ``method_head: classifier+pooler``). The saved file holds exactly the
parameters BitFit changed, so loading it onto the base model reproduces the fine-tuned one (BitFit
is merged by construction).
"""

from __future__ import annotations

from progtuning.methods.base import DeltaMethod, head_parameter_names


class BitFit(DeltaMethod):
    name = "bitfit"
    weights_file = "bitfit.safetensors"

    def delta_names(self, model, config) -> set[str]:
        biases = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
        return head_parameter_names(model, config.method_head) | biases


METHOD = BitFit()
