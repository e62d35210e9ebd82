"""``bloomwire simulate``: a seeded, time-compressed day of Berlin flower deliveries over MQTT.

:mod:`.plan` decides the day (pure, seeded); :mod:`.agents` are the people driving the real
clients; :mod:`.runner` plays the day against a live backbone; :mod:`.view` shows it.
"""

from bloomwire.app.simulate.agents import SimConfig
from bloomwire.app.simulate.plan import DayPlan, Fate, Rates, plan_day
from bloomwire.app.simulate.runner import SimResult, Simulation

__all__ = ["DayPlan", "Fate", "Rates", "SimConfig", "SimResult", "Simulation", "plan_day"]
