"""Max abs differences of our CLIP (image / text embeddings) against transformers' PyTorch CLIPModel on tiny
random models: the Flax-saved one (quick GELU) and a PyTorch model.safetensors (GELU). Run: python experiments/clip_parity.py"""
import json, os, shutil, warnings, sys, tempfile
import numpy as np, torch
sys.path.insert(0, "tests/similarity")
from amg_jax.similarity import clip
from test_clip import _images
from transformers import CLIPConfig, CLIPModel
from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
import flax.serialization
tmp = tempfile.mkdtemp()
tiny = clip.write_tiny_clip(os.path.join(tmp, "t"), seed=0)
prompts = ["a red circle", "a blue square on a gray background", "", "a photo of a striped dog"]
def diffs(b, tm, x):
    px = np.asarray(clip.clip_preprocess(x, b.resize_size, b.mean, b.std))
    ids, mask = clip.tokenize(b, prompts)
    with torch.no_grad():
        ti = tm.get_image_features(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).numpy()
        tt = tm.get_text_features(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).numpy()
    return (np.abs(np.asarray(clip.clip_image_embed(b, x, normalize=False)) - ti).max(),
            np.abs(np.asarray(clip.clip_text_embed(b, prompts, normalize=False)) - tt).max(), np.abs(ti).max())
b = clip.load_clip(tiny)
state = flax.serialization.msgpack_restore(open(os.path.join(tiny, "flax_model.msgpack"), "rb").read())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tm = load_flax_weights_in_pytorch_model(CLIPModel(CLIPConfig.from_pretrained(tiny)), state).eval()
print("msgpack (quick_gelu): image / text / |emb|max", diffs(b, tm, _images(4, 30)))
cfg = json.load(open(os.path.join(tiny, "config.json")))
cfg["vision_config"]["hidden_act"] = cfg["text_config"]["hidden_act"] = "gelu"
torch.manual_seed(0)
tm = CLIPModel(CLIPConfig(**{k: v for k, v in cfg.items() if k != "transformers_version"})).eval()
with torch.no_grad():
    tm.vision_model.embeddings.class_embedding.normal_(); tm.vision_model.embeddings.position_embedding.weight.normal_(std=0.1)
d = os.path.join(tmp, "pt"); tm.save_pretrained(d, safe_serialization=True)
for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
    shutil.copy(os.path.join(tiny, f), d)
print("safetensors (gelu): image / text / |emb|max", diffs(clip.load_clip(d), tm, _images(4, 40)))
