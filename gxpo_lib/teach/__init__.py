"""The notebooks and their companions: running them headless (`headless`), the toy landscapes (`toy`,
`toy_race`), the exercises and their checks (`exercises`, `check`), the live `dashboard`, the machine `doctor`,
offline HTML (`html_export`) and the `instructor_kit`."""
