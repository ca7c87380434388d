"""Model pieces shared by make_checkpoint.py and train.py: the configs, the masked-LM model that
predicts only at the masked positions, the seeded initialisation and the state-dict hash."""

import hashlib

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

# BERT-large as in MLPerf (24 layers, hidden 1024, 16 heads); `tiny` is for CPU tests only.
CONFIGS = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=512),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, max_position_embeddings=512),
}
INIT_STD = 0.02  # BERT's initializer_range; truncated at 2 std like the TF reference's truncated_normal


def bert_config(name, vocab_size=30522, pad_id=0):
    return BertConfig(vocab_size=vocab_size, type_vocab_size=2, hidden_act="gelu",
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      layer_norm_eps=1e-12, initializer_range=INIT_STD, pad_token_id=pad_id,
                      **CONFIGS[name])


class BertForMLPerfMLM(BertForMaskedLM):
    """BertForMaskedLM whose vocabulary projection runs only at the (at most 76) masked positions,
    as MLPerf's reference and NVIDIA's BERT do; the full (B, L, 30522) logits would cost more than
    attention at L=512 and hide what the attention backend changes. Same weights and state-dict
    keys as BertForMaskedLM.

    masked_lm_positions: (B, P) int, padded with 0; masked_lm_labels: (B, P), padded with -100.
    Returns logits (B, P, vocab) and the mean cross-entropy over the real predictions.

    A padding-free batch (train.py's --attn hf_flash_flat) is the B samples' tokens in one row,
    input_ids (1, T), with position_ids restarting at every sample, cu_seq_lens_q/k (B + 1,) its
    samples' boundaries and max_length_q/k a bound on their lengths, as transformers'
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them; masked_lm_positions then
    index that row.
    """

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                masked_lm_positions=None, masked_lm_labels=None, position_ids=None,
                cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None):
        flat = {} if cu_seq_lens_q is None else dict(
            position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q, max_length_k=max_length_k)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids, **flat).last_hidden_state
        if self.training and (attention_mask is not None or flat):
            # Real (non-padding) tokens trained on, kept on the device so no step waits on the host;
            # a plain attribute, not a buffer, so DDP does not overwrite it from rank 0.
            n = attention_mask.sum() if attention_mask is not None else cu_seq_lens_q[-1]
            seen = getattr(self, "tokens_seen", None)
            self.tokens_seen = n if seen is None else seen + n
        if flat:
            selected = hidden[0][masked_lm_positions.long()]
        else:
            idx = masked_lm_positions.long().unsqueeze(-1).expand(-1, -1, hidden.size(-1))
            selected = torch.gather(hidden, 1, idx)
        logits = self.cls(selected)
        loss = None
        if masked_lm_labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                   masked_lm_labels.long().view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


@torch.no_grad()
def seeded_init_(model, seed):
    """Overwrite every parameter from one seeded generator, in sorted-name order, so the weights do not
    depend on transformers' own init code, on module order or on the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    pad_id = model.config.pad_token_id
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("LayerNorm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            w = torch.empty(p.shape, dtype=torch.float32)
            torch.nn.init.trunc_normal_(w, mean=0.0, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD,
                                        generator=gen)
            p.copy_(w)
            if name.endswith("word_embeddings.weight") and pad_id is not None:
                p[pad_id].zero_()
    return model


def state_dict_sha256(model):
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry, in sorted-name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
