"""Model factory: our ConvNeXt V2 family first, any other timm model by name.

torch is imported when a model is named and timm only when the name is not ours, so
`import models` (and models.atomic, models.errors) stays cheap.
"""
import difflib

from models.errors import ModelError


def model_names():
    """Our model names (the fine-tuning and the FCMAE builders share them)."""
    from models.convnextv2 import VARIANTS
    return list(VARIANTS)


def _unknown(name, candidates, what, choices):
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose {choices}"
    return ModelError(f"unknown {what} {name!r}; {hint}")


def create_model(name, **kwargs):
    """Build `name`: one of ours (kwargs: num_classes, drop_path_rate, head_init_scale,
    in_chans, grad_checkpointing) or, for any other name, `timm.create_model(name, pretrained=False, **kwargs)`."""
    from models import convnextv2
    if name in convnextv2.VARIANTS:
        return getattr(convnextv2, name)(**kwargs)
    import timm  # only for names that are not ours (slow import)
    if not timm.is_model(name):
        raise _unknown(name, list(dict.fromkeys(model_names() + timm.list_models())), "model",
                       f"one of {', '.join(model_names())} or a timm model name")
    kwargs = dict(kwargs)
    kwargs.pop("head_init_scale", None)  # our head init; timm models have their own
    checkpointing = kwargs.pop("grad_checkpointing", False)
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:  # timm's own switch; models without it refuse (an assertion, or no such method)
        if checkpointing:
            model.set_grad_checkpointing(True)
    except (AssertionError, AttributeError, NotImplementedError) as e:
        why = f" ({e})" if str(e) else ""
        raise ModelError(f"grad_checkpointing is not supported by the timm model {name!r}{why}; "
                         "leave it off for this model") from None
    return model


def create_fcmae(name, **kwargs):
    """Build the FCMAE pretraining model with a `name` encoder (see models.fcmae.FCMAE)."""
    from models import fcmae
    if name not in model_names():
        raise _unknown(name, model_names(), "FCMAE model", "one of our ConvNeXt V2 encoders, "
                       f"{', '.join(model_names())} (FCMAE takes no timm models)")
    return getattr(fcmae, name)(**kwargs)
