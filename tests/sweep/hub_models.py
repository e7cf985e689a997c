"""keras-hub backbones built tiny from a config (no download), each with a batch of inputs it takes.

Each builder returns `(model, x)`: a randomly initialized backbone with 2 layers (or 2 stages), hidden sizes of
8 to 32 (ResNet's first stage must have 64 filters) and 1 to 4 heads, and its inputs for 8 samples, keyed like
`model.inputs`: token ids of 8 tokens, all-ones padding masks, normal floats for images (16x16 pixels for the vision
transformers, 32x32 for the conv nets) and audio features.
"""

import keras_hub
import numpy as np

models = keras_hub.models
SAMPLES = 8
SEQUENCE = 8
VOCABULARY = 64


def inputs_for(model, n=SAMPLES, sequence=SEQUENCE, seed=0):
    """A batch for `model`: random token ids below `VOCABULARY`, all-ones masks, normal floats elsewhere."""
    rng = np.random.default_rng(seed)
    batch = {}
    for tensor in model.inputs:
        shape = (n, *(sequence if d is None else d for d in tensor.shape[1:]))
        name = tensor.name
        if "mask" in name:
            batch[name] = np.ones(shape, "int32")
        elif "segment_ids" in name:
            batch[name] = np.zeros(shape, "int32")
        elif "int" in str(tensor.dtype):
            batch[name] = rng.integers(1, VOCABULARY, shape).astype("int32")
        else:
            batch[name] = rng.normal(size=shape).astype("float32")
    return batch if len(batch) > 1 or isinstance(model.input, dict) else next(iter(batch.values()))


def text(backbone, **config):
    """A text backbone of `VOCABULARY` tokens with 2 layers."""
    model = backbone(vocabulary_size=VOCABULARY, num_layers=2, **config)
    return model, inputs_for(model)


def gpt2():
    return text(models.GPT2Backbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def llama():
    return text(models.LlamaBackbone, num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32)


def mistral():
    return text(models.MistralBackbone, num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32)


def mixtral():
    return text(
        models.MixtralBackbone,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_experts=4,
        top_k=2,
    )


def qwen3_moe():
    return text(
        models.Qwen3MoeBackbone,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        moe_intermediate_dim=8,
        num_experts=4,
        top_k=2,
        head_dim=8,
    )


def gemma():
    return text(
        models.GemmaBackbone, num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8
    )


def phi3():
    return text(models.Phi3Backbone, num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)


def qwen():
    return text(models.QwenBackbone, num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)


def falcon():
    return text(models.FalconBackbone, num_attention_heads=2, hidden_dim=16, intermediate_dim=32)


def opt():
    return text(models.OPTBackbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def bloom():
    return text(models.BloomBackbone, num_heads=2, hidden_dim=16, intermediate_dim=32)


def bert():
    return text(models.BertBackbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def bert_frozen_top():
    """BERT set up for fine-tuning with its last transformer layer frozen; its layers share names with the first's."""
    model, x = bert()
    model.get_layer("transformer_layer_1").trainable = False
    return model, x


def roberta():
    return text(models.RobertaBackbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def deberta_v3():
    return text(
        models.DebertaV3Backbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16, bucket_size=4
    )


def distil_bert():
    return text(models.DistilBertBackbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def electra():
    model = models.ElectraBackbone(
        vocab_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        embedding_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    return model, inputs_for(model)


def albert():
    return text(
        models.AlbertBackbone,
        num_heads=2,
        embedding_dim=8,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )


def t5():
    return text(models.T5Backbone, num_heads=2, hidden_dim=16, intermediate_dim=32, key_value_dim=8)


def bart():
    return text(models.BartBackbone, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def whisper():
    return text(
        models.WhisperBackbone,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=16,
    )


def vit():
    model = models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return model, inputs_for(model)


def deit():
    model = models.DeiTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32
    )
    return model, inputs_for(model)


def dinov2():
    model = models.DINOV2Backbone(
        patch_size=4,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
        position_embedding_shape=(16, 16),
    )
    return model, inputs_for(model)


def resnet():
    model = models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        # ResNetBackbone requires 64 filters in its first stack.
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )
    return model, inputs_for(model)


def efficientnet():
    model = models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "unfused"],
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        num_features=32,
        input_shape=(32, 32, 3),
    )
    return model, inputs_for(model)


def mobilenet():
    model = models.MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32]],
        stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[8, 8], [16]],
        stackwise_kernel_size=[[3, 3], [3]],
        stackwise_num_strides=[[2, 1], [2]],
        stackwise_se_ratio=[[None, None], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        input_num_filters=8,
        image_shape=(32, 32, 3),
    )
    return model, inputs_for(model)


def densenet():
    model = models.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=(32, 32, 3))
    return model, inputs_for(model)


def cspnet():
    model = models.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1],
        stackwise_strides=[1, 2],
        stackwise_num_filters=[8, 16],
        block_type="dark_block",
        stage_type="dark",
        image_shape=(32, 32, 3),
    )
    return model, inputs_for(model)


def vgg():
    model = models.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16], image_shape=(32, 32, 3))
    return model, inputs_for(model)


def clip():
    vision = models.CLIPVisionEncoder(
        patch_size=4, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32, image_shape=(16, 16, 3)
    )
    text_encoder = models.CLIPTextEncoder(
        vocabulary_size=VOCABULARY,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=SEQUENCE,
    )
    model = models.CLIPBackbone(vision_encoder=vision, text_encoder=text_encoder, projection_dim=16)
    return model, inputs_for(model)


def sam():
    size = 32
    encoder = models.ViTDetBackbone(
        hidden_size=16,
        num_layers=2,
        intermediate_dim=32,
        num_heads=2,
        global_attention_layer_indices=[1],
        patch_size=8,
        num_output_channels=8,
        window_size=2,
        image_shape=(size, size, 3),
    )
    prompt_encoder = keras_hub.layers.SAMPromptEncoder(
        hidden_size=8, image_embedding_size=(4, 4), input_image_size=(size, size), mask_in_channels=16
    )
    mask_decoder = keras_hub.layers.SAMMaskDecoder(
        num_layers=2,
        hidden_size=8,
        intermediate_dim=16,
        num_heads=2,
        embedding_dim=8,
        num_multimask_outputs=3,
        iou_head_depth=2,
        iou_head_hidden_dim=8,
    )
    backbone = models.SAMBackbone(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
    # The backbone alone stops at the embeddings; the segmenter task runs the mask decoder too.
    model = models.SAMImageSegmenter(backbone=backbone)
    rng = np.random.default_rng(0)
    x = {
        "images": rng.normal(size=(SAMPLES, size, size, 3)).astype("float32"),
        "points": rng.uniform(0, size, (SAMPLES, 1, 2)).astype("float32"),
        "labels": np.ones((SAMPLES, 1), "float32"),
        "boxes": rng.uniform(0, size, (SAMPLES, 1, 2, 2)).astype("float32"),
        # One mask prompt, at 4 times the image embedding's resolution.
        "masks": rng.normal(size=(SAMPLES, 1, 16, 16, 1)).astype("float32"),
    }
    return model, x


def segformer():
    encoder = models.MiTBackbone(
        image_shape=(32, 32, 3),
        num_layers=2,
        hidden_dims=[8, 16],
        layerwise_depths=[1, 1],
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1],
        layerwise_patch_sizes=[3, 3],
        layerwise_strides=[2, 2],
        max_drop_path_rate=0.0,
    )
    model = models.SegFormerBackbone(image_encoder=encoder, projection_filters=16)
    return model, inputs_for(model)


def deeplab_v3():
    """A DeepLabV3 head on the tiny ResNet above: it builds its feature pyramid from the encoder's own tensors, so
    the encoder's additions belong to two Functional graphs."""
    encoder, x = resnet()
    model = models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P3",
        upsampling_size=2,
        dilation_rates=[1, 2],
        low_level_feature_key="P2",
        projection_filters=8,
        image_shape=(32, 32, 3),
    )
    return model, x
