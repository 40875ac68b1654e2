# A copy of the script of PEFT's model merging guide
# (https://huggingface.co/docs/peft/developer_guides/model_merging), with two substitutions only:
# TinyLlama is replaced by a small Llama-shaped model built from a config, and the three hub adapters
# (smangrul/tinyllama_lora_norobots, _sql, _adcopy) by local adapter directories. The test runs it as it is and
# with one added line, `import gomerge; gomerge.patch_peft()`, and compares the results.
import os

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

NOROBOTS, SQL, ADCOPY = os.environ["GUIDE_ADAPTERS"].split(os.pathsep)
torch.manual_seed(0)

config = PeftConfig.from_pretrained(NOROBOTS)
model = AutoModelForCausalLM.from_config(
    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
).eval()

model = PeftModel.from_pretrained(model, NOROBOTS, adapter_name="norobots")
_ = model.load_adapter(SQL, adapter_name="sql")
_ = model.load_adapter(ADCOPY, adapter_name="adcopy")

adapters = ["norobots", "adcopy", "sql"]
weights = [2.0, 1.0, 1.0]
adapter_name = "merge"
density = 0.2
model.add_weighted_adapter(adapters, weights, adapter_name, combination_type="ties", density=density)

model.set_adapter("merge")
inputs = {"input_ids": torch.tensor([[1, 17, 33, 5, 90, 64]])}
outputs = model.generate(
    **inputs,
    max_new_tokens=20,
    do_sample=True,
    top_p=0.95,
    temperature=0.2,
    repetition_penalty=1.0,
    eos_token_id=None,
    pad_token_id=0,
)
print(outputs[0].tolist())
model.save_pretrained(os.environ["GUIDE_OUTPUT"], selected_adapters=["merge"])
