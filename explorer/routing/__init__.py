"""The routing engine: a base model plus a library of LoRA experts, routed per token by Arrow.

Usage::

    from explorer.routing.config import RouterConfig      # how tokens are sent to experts (plain data)
    from explorer.routing.model import RoutedModel        # RoutedModel.from_library(base, library, router)
    from explorer.routing.trace import RoutingTrace       # what one run routed, with its reductions

Rooms: config (RouterConfig), layer (Arrow maths, the routed layer), inject (attach/detach, prototype cache
key), model (RoutedModel, the one loader), trace (RoutingTrace, user_token_span). Nothing here imports
gradio or the page; see docs/design.md, "Routing".
"""
