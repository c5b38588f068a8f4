"""ptylive.gpu"""
