"""patch_hf(model): a Hugging Face transformers causal LM of the Llama family trained on normengine's kernels,
in place and with the same parameters (as Liger-Kernel's apply_liger_kernel_to_*, but on an instance):

  * every RMSNorm (LlamaRMSNorm, MistralRMSNorm, Qwen2/Qwen3RMSNorm incl. Qwen3's q_norm / k_norm, ...) becomes a
    normengine.nn.RMSNorm holding the very same weight Parameter (ops.rms_norm: one kernel each way);
  * every gated MLP (gate_proj, up_proj, down_proj, act_fn silu or gelu_tanh) computes its activation with
    ops.swiglu / ops.geglu (one kernel each way, nothing saved but the projections);
  * with rope=True, rotary embeddings through ops.apply_rotary_pos_emb (one kernel each way). transformers calls
    its modeling module's apply_rotary_pos_emb by name, so this replaces that module-level function: every
    model of that architecture in the process then uses it (the same formula, up to float rounding);
  * the loss: a forward given `labels` computes the shifted next-token loss with ops.linear_cross_entropy from
    the last hidden states and the head's weight, never making the [tokens, vocab] logits (the returned
    output's `logits` is then None, as Liger's fused loss returns); without labels the forward is the
    model's own.

Numerics: the float32 model's loss and gradients match the unpatched model's to float rounding; in 16-bit
dtypes the norms round once (HF rounds the normalized value before the gain), so results differ by 16-bit
rounding. Gemma's (1 + w) norms and soft-capped logits are left as they are (not patched).
"""

from __future__ import annotations

import sys
import types

import torch

from .. import ops
from ..errors import UnsupportedError
from .norm import RMSNorm


def _is_hf_rmsnorm(m) -> bool:
    name = type(m).__name__
    return (name.endswith("RMSNorm") and not name.startswith("Gemma") and isinstance(getattr(m, "weight", None),
            torch.nn.Parameter) and m.weight.dim() == 1 and hasattr(m, "variance_epsilon"))


def _act_name(act):
    name = type(act).__name__
    if isinstance(act, torch.nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if name in ("PytorchGELUTanh", "GELUTanh") or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    return None


def _gated_mlp_forward(self, x):
    return self.down_proj(ops.gated_activation(self.gate_proj(x), self.up_proj(x), self._ne_act))


def _fused_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                        labels=None, **kwargs):
    if labels is None:
        return self._ne_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds, **kwargs)
    h = out.last_hidden_state[:, :-1]  # position t predicts token t + 1 (transformers' ForCausalLMLoss shift)
    target = labels[:, 1:].to(h.device)
    head = self.lm_head
    w = head.weight if head.weight.dtype == h.dtype else head.weight.to(h.dtype)
    if num_items is None:
        loss = ops.linear_cross_entropy(h, w, target, head.bias)
    else:  # gradient accumulation: the sum over this batch over the tokens of all of them
        loss = ops.linear_cross_entropy(h, w, target, head.bias, reduction="sum") / num_items
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))


def patch_hf(model, *, norms: bool = True, mlp: bool = True, loss: bool = True, rope: bool = False) -> dict:
    """Patch a transformers causal LM instance in place (see the module docstring); returns what was patched:
    {"norms": n, "mlps": n, "loss": bool, "rope": bool}. Calling it again patches nothing more."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedError(f"patch_hf: expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    done = {"norms": 0, "mlps": 0, "loss": False, "rope": False}
    if norms:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_hf_rmsnorm(child):
                    new = RMSNorm(child.weight.shape, eps=child.variance_epsilon)
                    new.weight = child.weight  # the same Parameter: optimizers and state_dicts see no change
                    setattr(parent, name, new)
                    done["norms"] += 1
    if mlp:
        for m in model.modules():
            if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
                    not hasattr(m, "_ne_act") and _act_name(m.act_fn) is not None:
                m._ne_act = _act_name(m.act_fn)
                m.forward = types.MethodType(_gated_mlp_forward, m)
                done["mlps"] += 1
    if loss and hasattr(model, "lm_head") and hasattr(model, "model") and not hasattr(model, "_ne_forward"):
        if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
            raise UnsupportedError("patch_hf(loss=True): soft-capped logits (final_logit_softcapping) are not "
                                   "fused; pass loss=False")
        model._ne_forward = model.forward
        model.forward = types.MethodType(_fused_loss_forward, model)
        done["loss"] = True
    if rope:
        module = sys.modules.get(type(model).__module__)
        if module is None or not callable(getattr(module, "apply_rotary_pos_emb", None)):
            raise UnsupportedError(f"patch_hf(rope=True): {type(model).__module__} has no apply_rotary_pos_emb")
        if getattr(module.apply_rotary_pos_emb, "__module__", None) != ops.rotary.__name__:
            module.apply_rotary_pos_emb = ops.apply_rotary_pos_emb
            done["rope"] = True
    return done
