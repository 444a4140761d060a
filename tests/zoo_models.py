"""The model zoo: tiny random-weight configurations of real model code.

Shared by ``tests/test_zoo.py`` and ``benchmarks/zoo.py``.  Each entry builds
a model as its library ships it (transformers families on each attention
path they support, torchvision classifiers), with a differentiable input, a
forward ``f(x)`` to take ``jvp`` of and a scalar ``loss()`` closure that reads
the live parameters (for the closure form of ``hvp``).

torchvision's PyPI wheel for torch 2.13 is a CUDA build whose C++ extension
does not load with CPU torch; its models are pure Python, but importing it
registers a fake kernel for ``torchvision::nms``, which fails when the C++
library did not define that operator.  ``torchvision()`` defines the two
operators' schemas first (no kernels), so the import works; the detection
ops stay unavailable, which classifiers never call.
"""

import collections
import importlib.util
import warnings

import torch
import torch.nn.functional as F

Case = collections.namedtuple("Case", "model x f loss")

_TORCHVISION_OPS = None


def _has_op(name):
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
    except RuntimeError:
        return False
    return True


def define_torchvision_ops():
    """Define the operator schemas torchvision's import registers fakes for, when its
    C++ library did not.  transformers imports torchvision whenever it is installed,
    so this has to happen before transformers is used too."""
    global _TORCHVISION_OPS
    if _TORCHVISION_OPS is not None or importlib.util.find_spec("torchvision") is None:
        return
    if not _has_op("torchvision::nms"):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS = lib  # keep the definitions alive


def torchvision():
    """torchvision, imported after ``define_torchvision_ops``; None if it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    define_torchvision_ops()
    import torchvision as tv

    return tv


define_torchvision_ops()


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


# ---- transformers ----------------------------------------------------------

SEQ, BATCH, VOCAB = 8, 2, 64
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=32, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def _gen():
    return torch.Generator().manual_seed(0)


def _ids(gen, batch=BATCH, seq=SEQ, low=3):
    return torch.randint(low, VOCAB, (batch, seq), generator=gen)


def _build(model_cls, config_cls, attention, dtype, **kwargs):
    _quiet_transformers()
    torch.manual_seed(0)
    config = config_cls(**kwargs)
    config._attn_implementation = attention
    model = model_cls(config).eval().to(dtype)
    return model


def _embeds(model, ids):
    emb = model.get_input_embeddings()(ids).detach()
    return emb


class Call(torch.nn.Module):
    """``f(x)`` as a module holding ``model``, so functional_call can substitute its parameters."""

    def __init__(self, model, f):
        super().__init__()
        self.model = model
        self._f = (f,)  # not registered: f may be the model itself

    def forward(self, x):
        return self._f[0](x)


def _text_model(model_name, config_name, attention, dtype, extra):
    """A transformers text model (by class names), token ids and their input embeddings."""
    import transformers

    model = _build(getattr(transformers, model_name), getattr(transformers, config_name), attention,
                   dtype, **{**_TEXT, **extra})
    ids = _ids(_gen())
    return model, ids, _embeds(model, ids)


def _causal_lm(model_name, config_name, **extra):
    def build(attention, dtype):
        model, ids, x = _text_model(model_name, config_name, attention, dtype, extra)

        def f(e):
            return model(inputs_embeds=e, use_cache=False).logits

        def loss():
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        return Case(model, x, f, loss)

    return build


def _masked_lm(model_name, config_name, **extra):
    def build(attention, dtype):
        model, ids, x = _text_model(model_name, config_name, attention, dtype, extra)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, -3:] = 0  # padding: a real attention mask

        def f(e):
            return model(inputs_embeds=e, attention_mask=mask).logits

        def loss():
            return model(input_ids=ids, attention_mask=mask, labels=ids).loss

        return Case(model, x, f, loss)

    return build


def _seq2seq(model_name, config_name, **extra):
    def build(attention, dtype):
        import transformers

        model = _build(getattr(transformers, model_name), getattr(transformers, config_name), attention,
                       dtype, **extra)
        gen = _gen()
        ids, dec = _ids(gen), _ids(gen, seq=SEQ - 2)
        x = _embeds(model, ids)

        def f(e):
            return model(inputs_embeds=e, decoder_input_ids=dec, use_cache=False).logits

        def loss():
            return model(input_ids=ids, labels=dec, use_cache=False).loss

        return Case(model, x, f, loss)

    return build


def _whisper(attention, dtype):
    import transformers

    model = _build(transformers.WhisperForConditionalGeneration, transformers.WhisperConfig, attention, dtype,
                   vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                   decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                   suppress_tokens=None, begin_suppress_tokens=None)
    gen = _gen()
    x = torch.randn(BATCH, 8, 16, generator=gen, dtype=dtype)  # 16 frames -> 8 after the stride-2 conv
    dec = _ids(gen, seq=4)

    def f(feats):
        return model(input_features=feats, decoder_input_ids=dec, use_cache=False).logits

    def loss():
        return model(input_features=x, labels=dec, use_cache=False).loss

    return Case(model, x, f, loss)


def _wav2vec2(attention, dtype):
    import transformers

    model = _build(transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Config, attention, dtype,
                   vocab_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                   num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, mask_time_prob=0.0,
                   pad_token_id=0, ctc_loss_reduction="mean")
    gen = _gen()
    x = torch.randn(BATCH, 400, generator=gen, dtype=dtype)  # 400 samples -> 39 frames
    labels = torch.randint(1, 12, (BATCH, 5), generator=gen)

    def f(audio):
        return model(input_values=audio).logits

    def loss():
        # Wav2Vec2ForCTC's own loss casts the log-probabilities to float32 (no
        # float64 oracle could check that); this is the same loss in the model's dtype.
        log_probs = model(input_values=x).logits.log_softmax(-1).transpose(0, 1)
        lengths = torch.full((BATCH,), log_probs.shape[0], dtype=torch.long)
        return F.ctc_loss(log_probs, labels, lengths, torch.full((BATCH,), labels.shape[1]), blank=0,
                          reduction="mean", zero_infinity=model.config.ctc_zero_infinity)

    return Case(model, x, f, loss)


def _vit(attention, dtype):
    import transformers

    model = _build(transformers.ViTForImageClassification, transformers.ViTConfig, attention, dtype,
                   hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   image_size=16, patch_size=4, num_channels=3, num_labels=5)
    gen = _gen()
    x = torch.randn(BATCH, 3, 16, 16, generator=gen, dtype=dtype)
    y = torch.tensor([1, 3])

    def f(pixels):
        return model(pixel_values=pixels).logits

    def loss():
        return F.cross_entropy(model(pixel_values=x).logits, y)

    return Case(model, x, f, loss)


def _clip(attention, dtype):
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=16, patch_size=4, num_channels=3)
    _quiet_transformers()
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    config._attn_implementation = attention
    config.text_config._attn_implementation = attention
    config.vision_config._attn_implementation = attention
    model = transformers.CLIPModel(config).eval().to(dtype)
    gen = _gen()
    ids = _ids(gen)
    x = torch.randn(BATCH, 3, 16, 16, generator=gen, dtype=dtype)

    def f(pixels):
        return model(input_ids=ids, pixel_values=pixels).logits_per_image

    def loss():
        out = model(input_ids=ids, pixel_values=x, return_loss=True)
        return out.loss

    return Case(model, x, f, loss)


TRANSFORMERS = {
    "gpt2": (_causal_lm("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32),
             ("eager", "sdpa")),
    "bert": (_masked_lm("BertForMaskedLM", "BertConfig"), ("eager", "sdpa")),
    "roberta": (_masked_lm("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1, bos_token_id=0),
                ("eager", "sdpa")),
    "t5": (_seq2seq("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                    num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1), ("eager", "sdpa")),
    "bart": (_seq2seq("BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=32,
                      encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=None), ("eager", "sdpa")),
    "llama": (_causal_lm("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), ("eager", "sdpa")),
    "mistral": (_causal_lm("MistralForCausalLM", "MistralConfig", num_key_value_heads=2, sliding_window=4),
                ("eager", "sdpa")),
    "qwen2": (_causal_lm("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2), ("eager", "sdpa")),
    "gemma": (_causal_lm("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=1, head_dim=8),
              ("eager", "sdpa")),
    "phi": (_causal_lm("PhiForCausalLM", "PhiConfig", num_key_value_heads=4), ("eager", "sdpa")),
    "gpt_neox": (_causal_lm("GPTNeoXForCausalLM", "GPTNeoXConfig"), ("eager", "sdpa")),
    "mamba": (_causal_lm("MambaForCausalLM", "MambaConfig", state_size=4, expand=2, conv_kernel=3,
                         num_hidden_layers=2, use_mambapy=False), ("eager",)),
    "whisper": (_whisper, ("eager", "sdpa")),
    "wav2vec2": (_wav2vec2, ("eager", "sdpa")),
    "vit": (_vit, ("eager", "sdpa")),
    "clip": (_clip, ("eager", "sdpa")),
}


# ---- torchvision -----------------------------------------------------------


def _classifier(make, size=32):
    def build(attention, dtype):
        tv = torchvision()
        torch.manual_seed(0)
        model = make(tv).eval().to(dtype)
        gen = _gen()
        _as_if_trained(model, gen)
        x = torch.randn(BATCH, 3, size, size, generator=gen, dtype=dtype)
        y = torch.tensor([1, 3])

        def loss():
            return F.cross_entropy(model(x), y)

        return Case(model, x, model, loss)

    return build


def _as_if_trained(model, gen):
    """Move the zero-initialised biases and the fresh batch-norm statistics off their
    initial values: at those, activations sit exactly on ReLU kinks (a structural
    zero), where finite differences are no oracle and no trained model sits."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith("running_var"):
                t.mul_(noise.mul_(0.2).exp_())
            elif name.endswith(("bias", "running_mean")) or name.endswith("weight") and t.dim() == 1:
                t.add_(noise, alpha=0.1)


def _resnet(tv):
    return tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)


def _regnet(tv):
    m = tv.models.regnet
    params = m.BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
    return m.RegNet(params, num_classes=5, stem_width=8)


def _convnext(tv):
    m = tv.models.convnext
    setting = [m.CNBlockConfig(16, 32, 1), m.CNBlockConfig(32, None, 1)]
    return m.ConvNeXt(setting, num_classes=5)


def _vit_b(tv):
    return tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=4,
                                       hidden_dim=32, mlp_dim=64, num_classes=5)


def _efficientnet(tv):
    m = tv.models.efficientnet
    setting, last = m._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return m.EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=5)


def _densenet(tv):
    return tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)


TORCHVISION = {
    "resnet": (_classifier(_resnet), ("default",)),
    "mobilenet_v3": (_classifier(lambda tv: tv.models.mobilenet_v3_small(num_classes=5, width_mult=0.25)),
                     ("default",)),
    "efficientnet": (_classifier(_efficientnet), ("default",)),
    "convnext": (_classifier(_convnext), ("default",)),
    "vit_b": (_classifier(_vit_b), ("default",)),
    "regnet": (_classifier(_regnet), ("default",)),
    "densenet": (_classifier(_densenet), ("default",)),
    "alexnet": (_classifier(lambda tv: tv.models.alexnet(num_classes=5), size=64), ("default",)),
}


def entries():
    """Every (family, name, attention path, build) in the zoo."""
    out = []
    for name, (build, paths) in TRANSFORMERS.items():
        out.extend(("transformers", name, path, build) for path in paths)
    for name, (build, paths) in TORCHVISION.items():
        out.extend(("torchvision", name, path, build) for path in paths)
    return out
