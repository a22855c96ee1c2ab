"""The method: Self-Alignment with Instruction Backtranslation (Li et al. 2023, arXiv:2308.06259).

Beneath it, ``model/`` (a hand-written Llama and its sampler) and ``lora/`` (LoRA, QLoRA and the
training loop) know nothing of the method; ``data/`` reads the datasets and holds the prompts.
This package is the method's steps, each a module a script runs:

=====================================  ===================  =====================================
step                                   module               script
=====================================  ===================  =====================================
backward model p(instruction|output)   training             ``train.py --direction backward``
self-augmentation                      backtranslate        ``generate.py --unlabelled``
self-curation                          rating, scores,      ``curate.py``
                                       curation
forward model p(output|instruction)    training             ``train.py --direction forward``
answers to a test set                  generation           ``generate.py --predict``
does it work?                          measures, metrics,   ``evaluate.py``
                                       evaluation,
                                       eval_report
quality vs quantity                    ablation             ``pipeline.py --ablation``
all of it, as cached stages            presets, stages,     ``pipeline.py``
                                       pipeline_run
=====================================  ===================  =====================================

What the scripts share: :mod:`humback.cli` (model flags, one-line errors), :mod:`humback.flags`
(every script's parser), :mod:`humback.inference` (loading a model with an adapter, and the
``complete``/``logprobs`` callables the steps take), :mod:`humback.sharding` (several processes
under torchrun), :mod:`humback.publish` (the hub).

The steps take the model work as plain callables (``complete(prompts) -> texts``), so each can
be read and tested without a model; the ``run(args)`` at the bottom of a step's module is what
its script does with a real one. Nothing here imports torch (or ``model/``, ``lora/``) at the top
of a module: the functions that load a model import it themselves, so ``--help``, a usage error
and the model-free tests answer at once.
"""
