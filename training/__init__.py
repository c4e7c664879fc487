"""The offline side: preference sets, trainers, evaluation gate, scheduler.

Built in a later change.
"""
