"""Full fine-tuning: every parameter trains; the whole model is saved (``model.safetensors``)."""

from __future__ import annotations

from progtuning.methods.base import Method, saved_model_class


class FullFineTuning(Method):
    name = "full"

    def apply(self, model, config, task_type):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model, config, out, state_dict=None):
        model.save_pretrained(out, state_dict=state_dict)

    def load(self, base, out, config, merge):
        from torch import nn

        cls = type(base) if isinstance(base, nn.Module) else saved_model_class(out)
        return cls.from_pretrained(out)


METHOD = FullFineTuning()
