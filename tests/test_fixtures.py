def test_tiny_llama_loads_with_real_tokenizer(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tokenizer("Recommend a movie:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, vocab]
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert tokenizer.encode(" A", add_special_tokens=False) == [330]  # single-token labels
