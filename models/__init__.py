"""Model factory: our ConvNeXt V2 family first, any other timm model by name.

timm is imported only when a name is not ours, so `import models` stays cheap.
"""
import difflib

from models import convnextv2
from models.convnextv2 import VARIANTS, ConvNeXtV2
from models.errors import ModelError

__all__ = ["create_model", "create_fcmae", "model_names", "ConvNeXtV2", "VARIANTS", "ModelError"]


def model_names():
    """Our model names (the fine-tuning and the FCMAE builders share them)."""
    return list(VARIANTS)


def _unknown(name, candidates, what, choices):
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose {choices}"
    return ModelError(f"unknown {what} {name!r}; {hint}")


def create_model(name, **kwargs):
    """Build `name`: one of ours (kwargs: num_classes, drop_path_rate, head_init_scale,
    in_chans, grad_checkpointing) or, for any other name, `timm.create_model(name, pretrained=False, **kwargs)`."""
    if name in VARIANTS:
        return getattr(convnextv2, name)(**kwargs)
    import timm  # only for names that are not ours (slow import)
    if not timm.is_model(name):
        raise _unknown(name, list(dict.fromkeys(model_names() + timm.list_models())), "model",
                       f"one of {', '.join(model_names())} or a timm model name")
    kwargs = dict(kwargs)
    kwargs.pop("head_init_scale", None)  # our head init; timm models have their own
    checkpointing = kwargs.pop("grad_checkpointing", False)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpointing:
        set_timm_grad_checkpointing(model, name)
    return model


def set_timm_grad_checkpointing(model, name):
    """timm's own switch; models without it refuse (an assertion, or no such method)."""
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, AttributeError, NotImplementedError) as e:
        why = f" ({e})" if str(e) else ""
        raise ModelError(f"grad_checkpointing is not supported by the timm model {name!r}{why}; "
                         "leave it off for this model") from None


def create_fcmae(name, **kwargs):
    """Build the FCMAE pretraining model with a `name` encoder (see models.fcmae.FCMAE)."""
    from models import fcmae
    if name not in VARIANTS:
        raise _unknown(name, model_names(), "FCMAE model", "one of our ConvNeXt V2 encoders, "
                       f"{', '.join(model_names())} (FCMAE takes no timm models)")
    return getattr(fcmae, name)(**kwargs)
