"""The chat format of a base that has none of its own.

A code base such as StarCoder2 or a CodeLlama base ships no ``tokenizer.chat_template``.
forged's question and docstring examples are chats, so such a base is trained in ChatML
written as plain text, and its published template (``forged.daemon.publish.CHATML``,
Ollama's own chatml.gotmpl) renders the same bytes. The model learns the format from the
examples; the strings are ordinary text pieces in its vocabulary.
"""

CHATML_JINJA = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
