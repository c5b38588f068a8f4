"""ptylive.streaming"""
