"""ptylive.tools"""
