"""Finding the setting per adapter: the sweep over a ladder of settings (with a user's evaluation) and the calibrated
pick (with the user's prompts), their results and pictures.
"""
