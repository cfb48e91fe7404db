"""Bidirectional Llama encoder: the remote-code format, written next to the weights only where
native EuroBERT cannot express the model (a fine-tuned *linear* sequence-classification head,
or last-token pooling; see docs/convert.md). Encoders otherwise export as native `eurobert`.

Load with `trust_remote_code=True` through AutoModel, AutoModelForMaskedLM,
AutoModelForSequenceClassification or AutoModelForTokenClassification. The blocks are
transformers' Llama blocks; only the attention mask differs: every token attends to every
non-padding token of its row (use right padding, as position ids count from the first token).
This file is standalone: it imports only torch and transformers.
"""

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput, TokenClassifierOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

# Attention implementations that take a prepared additive [B, 1, L, L] mask.
_DENSE_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


def padding_only_mask(attention_mask_BxL, batch, length, dtype, device):
    """Additive [B, 1, L, L] mask: 0 where the key is a real token, the dtype's minimum where it
    is padding. No causal part."""
    if attention_mask_BxL is None:
        keep_BxL = torch.ones((batch, length), dtype=torch.bool, device=device)
    else:
        keep_BxL = attention_mask_BxL.to(device=device, dtype=torch.bool)
    blocked_Bx1x1xL = ~keep_BxL[:, None, None, :]
    mask_Bx1xLxL = torch.zeros((batch, 1, length, length), dtype=dtype, device=device)
    return mask_Bx1xLxL.masked_fill(blocked_Bx1x1xL, torch.finfo(dtype).min)


class BidirLlamaModel(LlamaModel):
    """LlamaModel with bidirectional (padding-only) attention and no KV cache."""

    def __init__(self, config):
        config.is_causal = False
        config.use_cache = False
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        for key in ("use_cache", "cache", "past_key_values"):
            kwargs.pop(key, None)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("BidirLlamaModel: pass input_ids or inputs_embeds")
        batch, length = ref.shape[:2]
        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        if implementation in _DENSE_MASK_IMPLEMENTATIONS and (attention_mask is None or attention_mask.dim() == 2):
            dtype = inputs_embeds.dtype if inputs_embeds is not None else self.embed_tokens.weight.dtype
            attention_mask = padding_only_mask(attention_mask, batch, length, dtype, ref.device)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )


class _EncoderBase(LlamaPreTrainedModel):
    def _encode(self, input_ids, attention_mask, position_ids, inputs_embeds, kwargs):
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value


class BidirLlamaForMaskedLM(_EncoderBase):
    """Encoder plus the pretraining head: logits [B, L, V] at every position."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = BidirLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, kwargs)
        logits_BxLxV = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits_BxLxV.float().reshape(-1, logits_BxLxV.shape[-1]), labels.reshape(-1).to(logits_BxLxV.device)
            )
        return MaskedLMOutput(loss=loss, logits=logits_BxLxV, hidden_states=out.hidden_states,
                              attentions=out.attentions)


def _pool(h_BxLxD, attention_mask_BxL, how):
    """'mean' over non-padding tokens (default), 'first' token, or 'last' non-padding token."""
    if attention_mask_BxL is None:
        attention_mask_BxL = torch.ones(h_BxLxD.shape[:2], dtype=torch.long, device=h_BxLxD.device)
    keep_BxL = attention_mask_BxL.to(h_BxLxD.device)
    if how == "first":
        return h_BxLxD[:, 0]
    if how == "last":
        last_B = keep_BxL.long().sum(-1).clamp(min=1) - 1
        return h_BxLxD[torch.arange(h_BxLxD.shape[0], device=h_BxLxD.device), last_B]
    if how != "mean":
        raise ValueError(f"classifier_pooling must be 'mean', 'first' or 'last', got {how!r}")
    weights_BxLx1 = keep_BxL.to(h_BxLxD.dtype)[..., None]
    return (h_BxLxD * weights_BxLx1).sum(1) / weights_BxLx1.sum(1).clamp(min=1.0)


class BidirLlamaForSequenceClassification(_EncoderBase):
    """Pooled encoder output (config.classifier_pooling, default 'mean') -> num_labels."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BidirLlamaModel(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, kwargs)
        pooled_BxD = _pool(out.last_hidden_state, attention_mask, getattr(self.config, "classifier_pooling", "mean"))
        logits_BxC = self.score(self.dropout(pooled_BxD))
        loss = None
        if labels is not None:
            labels = labels.to(logits_BxC.device)
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = nn.functional.mse_loss(logits_BxC.squeeze(-1).float(), labels.float().reshape(-1))
            elif problem == "single_label_classification":
                loss = nn.functional.cross_entropy(logits_BxC.float(), labels.reshape(-1))
            else:
                loss = nn.functional.binary_cross_entropy_with_logits(logits_BxC.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits_BxC, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


class BidirLlamaForTokenClassification(_EncoderBase):
    """Per-token labels [B, L, num_labels]."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BidirLlamaModel(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, kwargs)
        logits_BxLxC = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits_BxLxC.float().reshape(-1, self.num_labels), labels.reshape(-1).to(logits_BxLxC.device)
            )
        return TokenClassifierOutput(loss=loss, logits=logits_BxLxC, hidden_states=out.hidden_states,
                                     attentions=out.attentions)
