"""Chat templates: tinytune renders, tokenizes, saves and trains on a checkpoint's Jinja chat template exactly as
transformers does, on real templates and tiny local tokenizers (no download).

Fixtures in tests/chat_templates/ (byte-identical to the published templates):
- llama3_1_instruct.jinja: meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json "chat_template", as stored by
  TRL (trl/chat_templates/llama3_1.jinja, "original Llama 3.1 template") in the installed trl package.
- qwen2_5_instruct.jinja: Qwen/Qwen2.5-*-Instruct "chat_template", from trl/chat_templates/qwen2_5.jinja.
- mistral_v0_3_instruct.jinja: mistralai/Mistral-7B-Instruct-v0.3 "chat_template" (tool-calling revision, with
  the role-order raise_exception), transcribed from a public copy found with the code search.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from tinytune import data  # noqa: E402
from tinytune.data import IGNORE  # noqa: E402
from tinytune.models import Tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "chat_templates"
CORPUS = ["hello world how are you today", "the weather is nice and sunny", "be brief please", "fine thanks",
          "héllo wörld 你好 ünïcödé", "what is two plus two it is four"]
# name: (fixture, special tokens, {"bos_token": ..., ...}, whether the post-processor adds BOS)
SPECS = {
    "llama3": ("llama3_1_instruct.jinja", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, True),
    "qwen2.5": ("qwen2_5_instruct.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False),
    "mistral": ("mistral_v0_3_instruct.jinja", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, True),
}
# what the scored tokens of an assistant turn decode to: its content (as the template writes it) + end of turn
SCORED = {"llama3": lambda c: c.strip() + "<|eot_id|>", "qwen2.5": lambda c: c + "<|im_end|>",
          "mistral": lambda c: " " + c.strip() + "</s>"}
SYSTEM = [{"role": "system", "content": "Be brief please."}, {"role": "user", "content": "héllo wörld 你好?"},
          {"role": "assistant", "content": " fine thanks "}]
MULTI = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you today"},
         {"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "it is four, ünïcödé"}]
PROMPT = [{"role": "user", "content": "the weather?"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather <today> in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def _write_tokenizer(directory: Path, specials, tokens: dict, adds_bos: bool, config_extra: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    if adds_bos:  # Llama / Mistral files add BOS by default: the chat path must not add it a second time
        bos = tokens["bos_token"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                               special_tokens=[(bos, backend.token_to_id(bos))])
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, **config_extra}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _pair(tmp_path, name, config_extra=None, in_config=True):
    """(tinytune Tokenizer, transformers tokenizer, directory) for SPECS[name], template in tokenizer_config.json."""
    fixture, specials, tokens, adds_bos = SPECS[name]
    template = (FIXTURES / fixture).read_text(encoding="utf-8")
    extra = {"chat_template": template} if in_config else {}
    directory = _write_tokenizer(tmp_path / name, specials, tokens, adds_bos, {**extra, **(config_extra or {})})
    return Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(str(directory)), directory


@pytest.fixture(params=list(SPECS))
def pair(request, tmp_path):
    return (request.param, *_pair(tmp_path, request.param))


def _hf_ids(hf, messages, **kwargs):
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("messages", [SYSTEM, MULTI, PROMPT], ids=["system", "multi_turn", "prompt"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_renders_and_encodes_as_transformers(pair, messages, add_generation_prompt):
    name, ours, hf, _ = pair
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == _hf_ids(hf, messages, add_generation_prompt=add_generation_prompt)
    if SPECS[name][3]:  # the template writes BOS; encoding its text must not add a second one
        assert ids[:2] != [ours.bos_token_id] * 2 and ids[0] == ours.bos_token_id


@pytest.mark.parametrize("kwargs", [dict(tools=TOOLS), dict(tools=TOOLS, date_string="1 Jan 2025"),
                                    dict(tools=TOOLS, tools_in_user_message=False), dict(date_string="2 Feb 2026")],
                         ids=["tools", "tools_date", "tools_in_system", "date"])
def test_llama3_tools_and_date_as_transformers(tmp_path, kwargs):
    ours, hf, _ = _pair(tmp_path, "llama3")
    for messages in (SYSTEM, MULTI):
        assert ours.apply_chat_template(messages, tokenize=False, **kwargs) == hf.apply_chat_template(
            messages, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == _hf_ids(hf, messages, **kwargs)


@pytest.mark.parametrize("name", ["qwen2.5", "mistral"])
def test_tools_as_transformers(tmp_path, name):
    ours, hf, _ = _pair(tmp_path, name)
    got = ours.apply_chat_template(MULTI, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert got == hf.apply_chat_template(MULTI, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "Weather <today> in a city" in got  # tojson keeps "<" (Jinja's own filter would escape it)


def test_template_errors_are_value_errors_naming_the_file(tmp_path):
    ours, hf, directory = _pair(tmp_path, "mistral")
    bad = [{"role": "user", "content": "hello"}, {"role": "user", "content": "world"}]
    with pytest.raises(Exception, match="conversation roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json 'chat_template'.*conversation roles must alternate"):
        ours.apply_chat_template(bad)
    (directory / "chat_template.jinja").write_text(ours.chat_template, encoding="utf-8")
    with pytest.raises(ValueError, match=r"chat_template\.jinja.*conversation roles must alternate"):
        Tokenizer.from_dir(directory).apply_chat_template(bad)
    ours.chat_template = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses it, as in transformers
    with pytest.raises(ValueError, match=r"tokenizer\.chat_templates\['default'\]"):
        ours.apply_chat_template(PROMPT)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    ours.chat_template = None
    with pytest.raises(ValueError, match="no default chat template"):
        ours.apply_chat_template(PROMPT)


def test_helpers_and_special_tokens_as_transformers(tmp_path):
    ours, hf, _ = _pair(tmp_path, "qwen2.5")
    template = ("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ messages | tojson }}|{{ strftime_now('%Y') }}"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}"
                "{% set ns = namespace(n=0) %}{{ dict(a=1) | tojson }}{% generation %}{{ extra }}{% endgeneration %}"
                "\n    {% if true %}\n    indented\n    {% endif %}\n")  # trim_blocks and lstrip_blocks matter here
    for tok in (ours, hf):
        tok.chat_template = template
    kwargs = dict(extra="x<y>", eos_token="OVERRIDE")  # a keyword argument overrides a special token
    assert ours.apply_chat_template(MULTI, tokenize=False, **kwargs) == hf.apply_chat_template(
        MULTI, tokenize=False, **kwargs)


def test_jinja_file_wins_over_config_and_named_templates(tmp_path):
    _, specials, tokens, adds_bos = SPECS["qwen2.5"]
    named = [{"name": "default", "template": "D{{ messages[0].content }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    directory = _write_tokenizer(tmp_path / "named", specials, tokens, adds_bos, {"chat_template": named})
    ours, hf = Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.chat_template == "D{{ messages[0].content }}" and set(ours.chat_templates) == {"default", "tool_use"}
    for kwargs in ({}, {"tools": TOOLS}, {"chat_template": "tool_use", "tools": []}):
        assert ours.apply_chat_template(PROMPT, tokenize=False, **kwargs) == hf.apply_chat_template(
            PROMPT, tokenize=False, **kwargs)
    ours.save(tmp_path / "saved")  # several templates: saved as the named list in tokenizer_config.json
    assert not (tmp_path / "saved" / "chat_template.jinja").exists()
    assert Tokenizer.from_dir(tmp_path / "saved").chat_templates == ours.chat_templates
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")).chat_template == dict(
        (t["name"], t["template"]) for t in named)
    (directory / "chat_template.jinja").write_text("J{{ messages | length }}", encoding="utf-8")
    ours, hf = Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.chat_template == hf.chat_template == "J{{ messages | length }}"
    assert set(ours.chat_templates) == {"default"}  # a .jinja file makes the config's templates ignored


def test_save_round_trip(pair, tmp_path):
    name, ours, hf, _ = pair
    out = tmp_path / "saved"
    ours.save(out)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" not in config  # transformers 5 layout: the template lives in chat_template.jinja
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == ours.chat_template
    again, hf_again = Tokenizer.from_dir(out), transformers.AutoTokenizer.from_pretrained(str(out))
    assert again.chat_template == hf_again.chat_template == ours.chat_template
    assert again.apply_chat_template(MULTI) == _hf_ids(hf_again, MULTI) == _hf_ids(hf, MULTI)
    again.chat_template = None
    again.save(out)  # removing the template and saving over the directory drops the old file
    assert not (out / "chat_template.jinja").exists() and Tokenizer.from_dir(out).chat_template is None


def _scored_texts(tok, example):
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(run) for run in runs + ([current] if current else [])]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_chats_scores_only_assistant_turns(pair, tmp_path):
    name, ours, hf, _ = pair
    chats = [SYSTEM, MULTI] if name != "mistral" else [SYSTEM[1:], MULTI]
    examples = data.load_chats(_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), ours)
    for messages, example in zip(chats, examples):
        assert example["input_ids"] == _hf_ids(hf, messages)
        assert _scored_texts(ours, example) == [SCORED[name](m["content"]) for m in messages
                                                if m["role"] == "assistant"]


def test_load_instructions_uses_the_chat_template(pair, tmp_path):
    name, ours, hf, _ = pair
    record = {"instruction": "what is two plus two?", "input": "be brief", "output": "four"}
    if name != "mistral":  # Mistral v0.3 puts the system prompt in the last user turn only: tested below
        record["system"] = "Be brief please."
    (example,) = data.load_instructions(_jsonl(tmp_path / "i.jsonl", [record]), ours)
    messages = ([{"role": "system", "content": record["system"]}] if "system" in record else []) + [
        {"role": "user", "content": "what is two plus two?\n\nbe brief"}, {"role": "assistant", "content": "four"}]
    assert example["input_ids"] == _hf_ids(hf, messages)
    assert _scored_texts(ours, example) == [SCORED[name]("four")]


def test_explicit_builtin_template_and_tokenizer_choice(tmp_path):
    ours, _, _ = _pair(tmp_path, "qwen2.5")
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}])
    (builtin,) = data.load_chats(path, ours, template="chatml")  # an explicit name keeps the built-in template
    assert builtin["input_ids"] == ours.encode(data.CHATML.render(MULTI), add_special_tokens=False)
    (chat,) = data.load_chats(path, ours)
    assert chat["input_ids"] != builtin["input_ids"]  # Qwen's template adds its default system prompt
    ours.chat_template = None
    assert data.load_chats(path, ours)[0]["input_ids"] == builtin["input_ids"]
    with pytest.raises(ValueError, match="template='tokenizer' needs a tokenizer with a chat template"):
        data.load_chats(path, ours, template="tokenizer")
    with pytest.raises(ValueError, match="'system' is set, but the 'alpaca' template has no system prompt"):
        data.load_instructions(_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b", "system": "c"}]), ours)


def test_not_prefix_stable_template_is_a_bad_record(tmp_path):
    ours, _, _ = _pair(tmp_path, "mistral")
    chat = [SYSTEM[0], *MULTI]  # Mistral moves the system prompt to the last user turn: prefixes change
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}, {"messages": chat}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: the chat template is not prefix-stable at message 2"):
        data.load_chats(path, ours)
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        examples = data.load_chats(path, ours, on_error="skip")
    assert len(examples) == 1 and len(examples.bad_records) == 1
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [MULTI[0], MULTI[2], MULTI[1]]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*conversation roles must alternate"):
        data.load_chats(bad, ours)


def test_chat_prompt_ids(pair):
    name, ours, hf, _ = pair
    assert data.chat_prompt_ids(ours, MULTI[:3]) == _hf_ids(hf, MULTI[:3], add_generation_prompt=True)
    assert data.chat_prompt_ids(ours, "the weather?") == _hf_ids(hf, PROMPT, add_generation_prompt=True)
    ours.chat_template = None  # without a chat template: chats in chatml, plain prompts as they are
    assert data.chat_prompt_ids(ours, "the weather?") == ours.encode("the weather?")
    want, _ = data.encode_segments(ours, data.CHATML.segments(PROMPT, add_generation_prompt=True))
    assert data.chat_prompt_ids(ours, PROMPT) == want
    assert data.chat_prompt_ids(ours, "hi", template="alpaca") == ours.encode(data.ALPACA.prompt("hi"))
    with pytest.raises(ValueError, match="needs a chat template"):
        data.chat_prompt_ids(ours, PROMPT, template="alpaca")


def test_import_tinytune_does_not_import_jinja2():
    code = "import sys, tinytune; sys.exit(1 if 'jinja2' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_preference_and_prompt_loaders_use_the_chat_template_for_chat_prompts(pair, tmp_path):
    name, ours, hf, _ = pair
    prompt = [{"role": "user", "content": "what is two plus two?"}]
    rows = [{"prompt": prompt, "chosen": "four", "rejected": "five"}]
    (pref,) = data.load_preferences(_jsonl(tmp_path / "p.jsonl", rows), ours)
    start = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert pref["prompt_ids"] == _hf_ids(hf, prompt, add_generation_prompt=True)
    for completion, text in zip(pref["completion_ids"], ("four", "five")):
        full = hf.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=False)
        assert ours.decode(completion) == full[len(start):].rstrip()  # the reply and its end-of-turn
        assert ours.decode(completion) == SCORED[name](text)
    (example,) = data.load_prompts(_jsonl(tmp_path / "q.jsonl", [{"prompt": prompt, "answer": "4"}]), ours)
    assert example["prompt_ids"] == pref["prompt_ids"] and example["answer"] == "4"
    (text_prompt,) = data.load_prompts(_jsonl(tmp_path / "t.jsonl", [{"prompt": "2+2="}]), ours)
    assert ours.decode(text_prompt["prompt_ids"], skip_special_tokens=True) == "2+2="  # text stays text
