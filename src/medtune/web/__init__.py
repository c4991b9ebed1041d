"""Browser demo for a (fine-tuned) model: chat, single exam questions, base vs tuned comparison.

``medtune.web.app.build_demo`` builds the gradio app from backends that are already loaded and
``medtune.web.app.launch`` serves it on localhost. This package does not import gradio at import
time, so the rest of medtune works without it.
"""
